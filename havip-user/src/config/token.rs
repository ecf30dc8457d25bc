//! `[api] token_file`: the file holding the bearer token TCP clients of the API must send.
//! It is a secret, so it must be private to its owner: a file that group or others may
//! read (or write, and so replace the token) is refused, with `chmod 600 FILE` as the fix.
//!
//! [`check`] looks at the file without reading the secret (for `--check-config`, startup
//! and reload, see `Config::load_for_apply`); [`read`] reads it for the server, checking the
//! opened file again so a `chmod` in between cannot slip through.

use std::{
    fs::Metadata,
    io::Read,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
};

/// Mode bits of a private file that must be clear: any permission for group or others.
const NOT_PRIVATE: u32 = 0o077;

/// What is wrong with a token file of metadata `meta` at `path`, if anything.
fn problem(path: &Path, meta: &Metadata) -> Option<String> {
    let p = path.display();
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Some(format!("{p} is {what}; give a regular file holding the token"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & NOT_PRIVATE != 0 {
        return Some(format!(
            "{p} has mode {mode:04o}: group or others may read or write the API's bearer token; run `chmod 600 {p}` (and use a new token if others could read it)"
        ));
    }
    if meta.len() == 0 {
        return Some(format!("{p} is empty; put a long random token in it"));
    }
    None
}

/// Checks the token file at `path` without reading the token: it exists, is a regular,
/// non-empty file, and has no permission bit for group or others.
pub fn check(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot use {}: {e}; create it (mode 600) with a long random token", path.display()))?;
    problem(path, &meta).map_or(Ok(()), Err)
}

/// Reads the token (trimmed) from `path`, refusing the file for the reasons of [`check`]
/// (its mode checked on the opened file) or if it holds only whitespace.
pub fn read(path: &Path) -> Result<String, String> {
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}; create it (mode 600) with a long random token", path.display());
    let mut f = std::fs::File::open(path).map_err(cannot)?;
    let meta = f.metadata().map_err(cannot)?;
    if let Some(p) = problem(path, &meta) {
        return Err(p);
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(|e| format!("cannot read {}: {e}; the token must be UTF-8 text", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{} holds only whitespace; put a long random token in it", path.display()));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A fresh directory for one test's files, removed on drop.
    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!("havip-token-test-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir(&d).unwrap();
            Dir(d)
        }
        fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_private_file_is_accepted_and_read_trimmed() {
        let d = Dir::new("ok");
        for mode in [0o600, 0o400] {
            let p = d.file(&format!("t{mode:o}"), "  s3cret\n", mode);
            assert_eq!(check(&p), Ok(()), "mode {mode:o}");
            assert_eq!(read(&p).as_deref(), Ok("s3cret"), "mode {mode:o}");
        }
    }

    #[test]
    fn any_permission_for_group_or_others_is_refused_with_the_fix() {
        let d = Dir::new("mode");
        for mode in [0o644, 0o640, 0o620, 0o610, 0o604, 0o602, 0o601, 0o666] {
            let p = d.file(&format!("t{mode:o}"), "s3cret\n", mode);
            for (how, result) in [("check", check(&p)), ("read", read(&p).map(|_| ()))] {
                let e = result.expect_err(&format!("{how}: mode {mode:o} accepted"));
                assert!(e.contains(&format!("{mode:04o}")) && e.contains(&format!("chmod 600 {}", p.display())), "{how} {mode:o}: {e}");
            }
        }
    }

    #[test]
    fn missing_empty_and_non_regular_files_are_refused() {
        let d = Dir::new("kinds");
        let missing = d.0.join("missing");
        assert!(check(&missing).unwrap_err().contains("create it (mode 600)"));
        assert!(read(&missing).unwrap_err().contains("create it (mode 600)"));
        let empty = d.file("empty", "", 0o600);
        assert!(check(&empty).unwrap_err().contains("is empty"));
        assert!(read(&empty).unwrap_err().contains("is empty"));
        let blank = d.file("blank", " \n", 0o600);
        assert!(read(&blank).unwrap_err().contains("only whitespace"));
        let dir = d.0.join("dir");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(check(&dir).unwrap_err().contains("a directory"));
    }
}
