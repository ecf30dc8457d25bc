//! Bulk reads of pinned maps for the readers (`havip stats`, `havip top`, metrics scrapes),
//! with every bpf() call counted.
//!
//! aya 0.14 reads a map one element per syscall (two per hash entry: next key, then value)
//! and has no BPF_MAP_LOOKUP_BATCH, so reading all counters that way cost a stats read
//! about 23,000 calls. This is the one place that calls bpf() directly to read maps: it
//! opens pinned maps read-only, checks each map's kind and sizes against the Rust types read
//! out of it (the kernel writes `count` values of the map's own size into our buffers), and
//! reads ranges of arrays and whole hash maps with BPF_MAP_LOOKUP_BATCH (kernel 5.6+, for
//! arrays, per-CPU arrays, hashes, per-CPU hashes and LRU hashes alike).
//!
//! Every call made here is counted on the calling thread ([`calls`]): a reader that makes
//! its map reads only through this module knows exactly how many bpf() calls a read took.

use std::{
    cell::Cell,
    ffi::CString,
    io,
    mem::size_of,
    ops::Range,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{bail, Context};

thread_local! {
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

/// bpf() calls this thread has made through this module so far.
pub fn calls() -> u64 {
    CALLS.with(Cell::get)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `file_flags` of BPF_OBJ_GET: a read-only fd (readers never write).
const BPF_F_RDONLY: u32 = 1 << 3;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;

/// Most bytes (keys and values) one batch call returns: large enough that the VIP counters
/// of 10,000 VIPs on a few CPUs come back in one call, small enough to bound the buffer on
/// machines with hundreds of CPUs (per-CPU values are one copy per possible CPU).
const BATCH_BYTES: usize = 4 << 20;

/// The one bpf() entry point of this module, so that every call is counted.
fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    CALLS.with(|c| c.set(c.get() + 1));
    // SAFETY: `attr` is the #[repr(C)] member of `union bpf_attr` that `cmd` reads, passed
    // with its size; the pointers in it point at live buffers sized for what `cmd` writes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, size_of::<A>() as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of the kernel's `struct bpf_map_info` (the kernel fills what fits).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct MapInfo {
    kind: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
}

#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// What one BPF_MAP_LOOKUP_BATCH call returned.
enum Batch {
    /// This many entries, and more may follow from `out_batch`.
    More(u32),
    /// This many entries, and the map has no more.
    End(u32),
    /// A hash bucket holds more entries than `count`: ask again with at least this many.
    TooSmall(u32),
}

/// A pinned map opened read-only, its layout known.
pub struct PinnedMap {
    fd: OwnedFd,
    info: MapInfo,
    name: String,
}

impl PinnedMap {
    /// Opens the map pinned at `path` (two calls: BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let name = path.display().to_string();
        let c_path = CString::new(path.as_os_str().as_bytes()).with_context(|| format!("{name}: a NUL in the path"))?;
        let mut attr = ObjGetAttr { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: BPF_F_RDONLY, path_fd: 0, _pad: 0 };
        let fd = sys_bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("cannot open pinned map {name}: is havip installed here (havipd started once)?"))?;
        // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = MapInfo::default();
        let mut attr = InfoAttr { bpf_fd: fd.as_raw_fd() as u32, info_len: size_of::<MapInfo>() as u32, info: &mut info as *mut MapInfo as u64 };
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).with_context(|| format!("reading what map {name} is"))?;
        Ok(Self { fd, info, name })
    }

    pub fn max_entries(&self) -> u32 {
        self.info.max_entries
    }

    /// The map's layout as the kernel describes it (for `map_layout`'s check).
    pub fn shape(&self) -> crate::kernel::map_layout::MapShape {
        let i = &self.info;
        crate::kernel::map_layout::MapShape { map_type: i.kind, key_size: i.key_size, value_size: i.value_size, max_entries: i.max_entries }
    }

    fn percpu(&self) -> bool {
        matches!(self.info.kind, BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_LRU_PERCPU_HASH)
    }

    /// Fails unless the map is of one of `kinds` with keys of `K` and values of `V`: the
    /// kernel copies its own sizes into buffers sized from ours.
    fn expect<K, V>(&self, kinds: &[u32]) -> anyhow::Result<()> {
        let i = &self.info;
        if !kinds.contains(&i.kind) || i.key_size as usize != size_of::<K>() || i.value_size as usize != size_of::<V>() {
            bail!(
                "map {} is of kind {} with {}-byte keys and {}-byte values; this havip reads kind {:?} with {} and {} (pinned by another havip version?)",
                self.name,
                i.kind,
                i.key_size,
                i.value_size,
                kinds,
                size_of::<K>(),
                size_of::<V>()
            );
        }
        Ok(())
    }

    /// Bytes of one entry's value in a batch: per-CPU maps give one copy per possible CPU,
    /// each rounded up to 8 bytes.
    fn stride(&self, ncpus: usize) -> usize {
        let v = self.info.value_size as usize;
        if self.percpu() {
            v.next_multiple_of(8) * ncpus
        } else {
            v
        }
    }

    fn batch(&self, in_batch: Option<&[u8]>, out_batch: &mut [u8], keys: &mut [u8], values: &mut [u8], count: u32) -> anyhow::Result<Batch> {
        let mut attr = BatchAttr {
            in_batch: in_batch.map_or(0, |b| b.as_ptr() as u64),
            out_batch: out_batch.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count,
            map_fd: self.fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        match sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(_) => Ok(Batch::More(attr.count)),
            // The walk reached the map's end; `count` says how many it copied before.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Batch::End(attr.count)),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Ok(Batch::TooSmall(attr.count)),
            Err(e) => Err(e).with_context(|| format!("reading map {}", self.name)),
        }
    }

    /// Entries per call within [`BATCH_BYTES`].
    fn per_call(&self, ncpus: usize) -> usize {
        (BATCH_BYTES / (self.info.key_size as usize + self.stride(ncpus)).max(1)).max(1)
    }

    /// Calls `f(index, value bytes)` for the elements of an array map in `ranges`
    /// (clipped to the array), one batch call per range or per [`BATCH_BYTES`].
    fn read_array(&self, ranges: &[Range<u32>], ncpus: usize, mut f: impl FnMut(u32, &[u8])) -> anyhow::Result<()> {
        let stride = self.stride(ncpus);
        let per_call = self.per_call(ncpus);
        for r in ranges {
            let (mut pos, end) = (r.start, r.end.min(self.info.max_entries));
            while pos < end {
                let count = ((end - pos) as usize).min(per_call);
                let mut keys = vec![0u8; count * 4];
                let mut values = vec![0u8; count * stride];
                // The cursor is the key before the first one wanted (none: from index 0).
                let before = pos.checked_sub(1).map(u32::to_ne_bytes);
                let mut out = [0u8; 8];
                let got = match self.batch(before.as_ref().map(|b| &b[..]), &mut out, &mut keys, &mut values, count as u32)? {
                    Batch::More(n) | Batch::End(n) => n as usize,
                    Batch::TooSmall(_) => bail!("map {}: the kernel refused an array batch of {count}", self.name),
                };
                if got == 0 {
                    break;
                }
                for i in 0..got.min(count) {
                    let index = u32::from_ne_bytes(keys[i * 4..i * 4 + 4].try_into().unwrap());
                    f(index, &values[i * stride..(i + 1) * stride]);
                }
                pos += got as u32;
            }
        }
        Ok(())
    }

    /// Calls `f(key bytes, value bytes)` for every entry of a hash map.
    fn read_hash(&self, ncpus: usize, mut f: impl FnMut(&[u8], &[u8])) -> anyhow::Result<()> {
        let (key_size, stride) = (self.info.key_size as usize, self.stride(ncpus));
        let mut count = self.per_call(ncpus).min(self.info.max_entries.max(1) as usize);
        // The cursor of a hash batch is a bucket number (u32).
        let mut cursor: Option<[u8; 8]> = None;
        loop {
            let mut keys = vec![0u8; count * key_size];
            let mut values = vec![0u8; count * stride];
            let mut out = [0u8; 8];
            let (got, end) = match self.batch(cursor.as_ref().map(|c| &c[..]), &mut out, &mut keys, &mut values, count as u32)? {
                Batch::More(n) => (n as usize, false),
                Batch::End(n) => (n as usize, true),
                Batch::TooSmall(need) => {
                    count = (need as usize).max(count * 2);
                    continue;
                }
            };
            for i in 0..got.min(count) {
                f(&keys[i * key_size..(i + 1) * key_size], &values[i * stride..(i + 1) * stride]);
            }
            if end {
                return Ok(());
            }
            cursor = Some(out);
        }
    }

    /// Elements `ranges` of an array map, by index.
    pub fn array<V: aya::Pod>(&self, ranges: &[Range<u32>]) -> anyhow::Result<Vec<(u32, V)>> {
        self.expect::<u32, V>(&[BPF_MAP_TYPE_ARRAY])?;
        let mut out = Vec::new();
        self.read_array(ranges, 1, |i, v| out.push((i, pod::<V>(v))))?;
        Ok(out)
    }

    /// Every element of an array map, by index.
    pub fn array_all<V: aya::Pod>(&self) -> anyhow::Result<Vec<(u32, V)>> {
        self.array(std::slice::from_ref(&(0..self.info.max_entries)))
    }

    /// Elements `ranges` of a per-CPU array map, by index: one value per possible CPU.
    pub fn percpu_array<V: aya::Pod>(&self, ranges: &[Range<u32>], ncpus: usize) -> anyhow::Result<Vec<(u32, Vec<V>)>> {
        self.expect::<u32, V>(&[BPF_MAP_TYPE_PERCPU_ARRAY])?;
        let mut out = Vec::new();
        self.read_array(ranges, ncpus, |i, v| out.push((i, per_cpu::<V>(v, ncpus))))?;
        Ok(out)
    }

    /// Every element of a per-CPU array map, by index.
    pub fn percpu_array_all<V: aya::Pod>(&self, ncpus: usize) -> anyhow::Result<Vec<(u32, Vec<V>)>> {
        self.percpu_array(std::slice::from_ref(&(0..self.info.max_entries)), ncpus)
    }

    /// Every entry of a hash map (plain or LRU), in the kernel's bucket order.
    pub fn hash<K: aya::Pod, V: aya::Pod>(&self) -> anyhow::Result<Vec<(K, V)>> {
        self.expect::<K, V>(&[BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH])?;
        let mut out = Vec::new();
        self.read_hash(1, |k, v| out.push((pod::<K>(k), pod::<V>(v))))?;
        Ok(out)
    }

    /// Every entry of a per-CPU hash map: one value per possible CPU.
    pub fn percpu_hash<K: aya::Pod, V: aya::Pod>(&self, ncpus: usize) -> anyhow::Result<Vec<(K, Vec<V>)>> {
        self.expect::<K, V>(&[BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_LRU_PERCPU_HASH])?;
        let mut out = Vec::new();
        self.read_hash(ncpus, |k, v| out.push((pod::<K>(k), per_cpu::<V>(v, ncpus))))?;
        Ok(out)
    }
}

/// A value from the bytes the kernel copied out (`expect` checked their size).
fn pod<T: aya::Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: `T: Pod` is valid for any bit pattern, and `bytes` holds at least one `T`.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) }
}

/// The per-CPU copies of a value: one per possible CPU, each 8-byte aligned.
fn per_cpu<T: aya::Pod>(bytes: &[u8], ncpus: usize) -> Vec<T> {
    let step = size_of::<T>().next_multiple_of(8);
    (0..ncpus).map(|c| pod::<T>(&bytes[c * step..])).collect()
}

/// The ranges of array indexes covering `ids`, merging neighbours up to `gap` apart: reading
/// a few unused elements costs less than another call.
pub fn runs(ids: impl IntoIterator<Item = u32>, gap: u32) -> Vec<Range<u32>> {
    let mut ids: Vec<u32> = ids.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut out: Vec<Range<u32>> = Vec::new();
    for id in ids {
        match out.last_mut() {
            Some(r) if id - r.end <= gap => r.end = id.saturating_add(1),
            _ => out.push(id..id.saturating_add(1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_cover_ids_and_merge_small_gaps() {
        assert!(runs([], 4).is_empty());
        assert_eq!(runs([3], 4), vec![3..4]);
        // Unsorted and repeated ids; 0..3 and 5 are 2 apart (merged), 100 is not.
        assert_eq!(runs([5, 0, 2, 1, 2, 100], 4), vec![0..6, 100..101]);
        assert_eq!(runs([0, 10], 0), vec![0..1, 10..11]);
        assert_eq!(runs([0, 1, 2], 0), vec![0..3]);
        assert_eq!(runs([u32::MAX - 1], 4), vec![u32::MAX - 1..u32::MAX]);
    }
}
