//! The writer's side of [`havip_common::versioned`]: `BINDINGS` and `VIP_SLOTS` are
//! mappable arrays (`BPF_F_MMAPABLE`), mapped into this process, and a new version is
//! published with plain stores in the order the programs' readers rely on: the copy no
//! reader of the current generation uses, then the generation with one aligned 8-byte
//! atomic store. A `bpf_map_update_elem` would copy the whole element with the kernel's
//! `memcpy`, in an order (and store widths) nobody promises, generation included.
//!
//! There is one writer per array: havipd (each process maps its own view of the same
//! memory; tests write through their own, one writer at a time).

use std::{
    mem::size_of,
    ptr::{self, NonNull},
    sync::atomic::{fence, AtomicU64, Ordering},
};

use anyhow::{bail, Context};
use aya::{
    maps::{Array, IterableMap, Map, MapData, MapError},
    Pod,
};
use havip_common::Versioned;

/// A pinned array of `Versioned<T>`, mapped for writing.
pub struct VersionedArray<T: Pod> {
    map: Array<MapData, Versioned<T>>,
    base: NonNull<Versioned<T>>,
    len: u32,
    mapped: usize,
}

// SAFETY: the mapping is owned by this value (unmapped on drop) and only written through
// `&mut self`; the kernel's programs only read it.
unsafe impl<T: Pod> Send for VersionedArray<T> {}

impl<T: Pod> VersionedArray<T> {
    /// Maps the pinned array `map` (created with `BPF_F_MMAPABLE`) into this process.
    pub fn new(map: Map, name: &str) -> anyhow::Result<Self> {
        let map: Array<MapData, Versioned<T>> = map.try_into().with_context(|| format!("{name}: not an array of the expected value size"))?;
        let len = map.len();
        // The kernel lays elements out every value size rounded up to 8 bytes, from offset 0
        // of the mapping; `Versioned` sizes are multiples of 8 (asserted in havip-common).
        if size_of::<Versioned<T>>() % 8 != 0 {
            bail!("{name}: value size {} is not a multiple of 8", size_of::<Versioned<T>>());
        }
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mapped = (len as usize * size_of::<Versioned<T>>()).div_ceil(page) * page;
        use std::os::fd::{AsFd, AsRawFd};
        let fd = map.map().fd().as_fd().as_raw_fd();
        // SAFETY: a shared mapping of the map's own memory, `mapped` bytes from offset 0.
        let p = unsafe { libc::mmap(ptr::null_mut(), mapped, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {name} into memory (it must be created with BPF_F_MMAPABLE: `havip down` removes older pins)"));
        }
        let base = NonNull::new(p as *mut Versioned<T>).context("mmap returned null")?;
        Ok(Self { map, base, len, mapped })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The current version of element `idx` (a `bpf_map_lookup_elem`; only this process
    /// writes, so it never races a publication of its own). As `aya`'s `Array::get`.
    pub fn get(&self, idx: &u32, flags: u64) -> Result<T, MapError> {
        Ok(self.map.get(idx, flags)?.current())
    }

    /// Every element's current version, in index order.
    pub fn iter(&self) -> impl Iterator<Item = Result<T, MapError>> + '_ {
        (0..self.len).map(|i| self.get(&i, 0))
    }

    /// Publishes `value` as the new version of element `idx` (nothing is written if it is
    /// the current one already).
    pub fn publish(&mut self, idx: u32, value: T) -> anyhow::Result<()>
    where
        T: PartialEq,
    {
        if idx >= self.len {
            bail!("index {idx} is beyond the array ({} elements)", self.len);
        }
        // SAFETY: `idx` is in bounds of the mapping, and elements are 8-aligned (page-aligned
        // base, 8-byte multiple stride), as `AtomicU64` needs.
        unsafe {
            let cell = self.base.as_ptr().add(idx as usize);
            let gen = AtomicU64::from_ptr(&raw mut (*cell).gen);
            let g = gen.load(Ordering::Relaxed);
            if (*cell).copies[(g & 1) as usize] == value {
                return Ok(());
            }
            // The store of `g` (the previous publication, maybe by an earlier process) comes
            // before any byte of this copy: a reader that saw `g - 1` may still read it.
            fence(Ordering::Release);
            let next = &raw mut (*cell).copies[(*cell).next_index()];
            ptr::write_volatile(next, value);
            // ...and every byte of the copy before the store that makes it current.
            gen.store(g.wrapping_add(1), Ordering::Release);
        }
        Ok(())
    }
}

impl<T: Pod> Drop for VersionedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.mapped) };
    }
}
