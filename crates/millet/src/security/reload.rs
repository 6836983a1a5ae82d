//! [`ReloadableFile`]: the parsed content of a file read at start-up and
//! re-read on demand, shared lock-free behind `arc-swap`.
//!
//! This module owns the "keep the old content when the new file is bad" rule:
//! [`ReloadableFile::reload`] swaps in the new content only when the whole
//! file loaded, and returns the error otherwise (the caller logs it, once; the
//! error names the file). *When* to reload (SIGHUP, a changed modification
//! stamp) is decided by [`super::refresh`], not here; the stamp itself,
//! [`FileStamp`], is defined here (also used by [`super::tls`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::{ArcSwap, Guard};

/// A file's modification time and size (`None`: cannot be read): a change
/// to either means the file changed.
pub type FileStamp = Option<(SystemTime, u64)>;

/// The [`FileStamp`] of the file at `path`.
pub fn file_stamp(path: &Path) -> FileStamp {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())))
}

/// The [`FileStamp`] of each path, in order.
pub fn file_stamps<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> Vec<FileStamp> {
    paths.into_iter().map(|p| file_stamp(p)).collect()
}

/// Reads and parses the file at a path.
pub type Loader<T, E> = fn(&Path) -> Result<T, E>;

/// Content `T` loaded from a file by a [`Loader`] (or fixed, without a file).
#[derive(Debug)]
pub struct ReloadableFile<T, E> {
    /// The file and how to load it; `None`: fixed content, reload does nothing.
    source: Option<(PathBuf, Loader<T, E>)>,
    current: ArcSwap<T>,
}

impl<T: Default, E> Default for ReloadableFile<T, E> {
    fn default() -> Self {
        ReloadableFile::fixed(T::default())
    }
}

impl<T, E> ReloadableFile<T, E> {
    /// Fixed content, not backed by a file.
    pub fn fixed(value: T) -> Self {
        ReloadableFile {
            source: None,
            current: ArcSwap::from_pointee(value),
        }
    }

    /// Load `path` now (an error here is the caller's to report, usually as
    /// fatal); [`ReloadableFile::reload`] re-reads it.
    pub fn open(path: impl Into<PathBuf>, load: Loader<T, E>) -> Result<Self, E> {
        let path = path.into();
        let value = load(&path)?;
        Ok(Self::with_value(path, load, value))
    }

    /// Backed by `path` but starting with `value` (not read from it).
    pub fn with_value(path: impl Into<PathBuf>, load: Loader<T, E>, value: T) -> Self {
        ReloadableFile {
            source: Some((path.into(), load)),
            current: ArcSwap::from_pointee(value),
        }
    }

    /// The file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.source.as_ref().map(|(p, _)| p.as_path())
    }

    /// Re-read the file and swap in its content. On error the current
    /// content stays in force and the error is returned (for the caller to
    /// log). `Ok(None)`: no file, nothing done; `Ok(Some(new))`: reloaded.
    pub fn reload(&self) -> Result<Option<Arc<T>>, E> {
        let Some((path, load)) = &self.source else {
            return Ok(None);
        };
        let new = Arc::new(load(path)?);
        self.current.store(Arc::clone(&new));
        Ok(Some(new))
    }

    /// The content now in force (cheap, for a short borrow).
    pub fn load(&self) -> Guard<Arc<T>> {
        self.current.load()
    }

    /// The content now in force, as an `Arc` to keep.
    pub fn load_full(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Replace the content in memory (the file is not written).
    pub fn store(&self, value: T) {
        self.current.store(Arc::new(value));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn load_number(path: &Path) -> Result<u32, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        text.trim()
            .parse()
            .map_err(|_| format!("bad number {text:?}"))
    }

    #[test]
    fn reload_keeps_old_content_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        assert!(ReloadableFile::open(&path, load_number).is_err());
        std::fs::write(&path, "1").unwrap();
        let f = ReloadableFile::open(&path, load_number).unwrap();
        assert_eq!(f.path(), Some(path.as_path()));
        assert_eq!(**f.load(), 1);
        std::fs::write(&path, "x").unwrap();
        assert!(f.reload().is_err());
        assert_eq!(*f.load_full(), 1);
        std::fs::remove_file(&path).unwrap();
        assert!(f.reload().is_err());
        assert_eq!(**f.load(), 1);
        std::fs::write(&path, "2").unwrap();
        assert_eq!(f.reload().unwrap().as_deref(), Some(&2));
        assert_eq!(**f.load(), 2);
        f.store(3);
        assert_eq!(**f.load(), 3);
    }

    #[test]
    fn fixed_content_does_not_reload() {
        let f: ReloadableFile<u32, String> = ReloadableFile::default();
        assert_eq!(f.path(), None);
        assert_eq!(f.reload(), Ok(None));
        assert_eq!(**f.load(), 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "5").unwrap();
        let f = ReloadableFile::with_value(&path, load_number, 4);
        assert_eq!(**f.load(), 4);
        assert_eq!(f.reload().unwrap().as_deref(), Some(&5));
    }
}
