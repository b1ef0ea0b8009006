//! Removal that does not wait for the file system to free the space.
//!
//! Unlinking a multi-GB file makes the kernel free every extent inside the
//! call (and trim them, on a volume mounted with `discard`): on ext4 here
//! a rename that replaced a stored 1 GiB blob took 178 ms. A finished upload
//! whose blob was already stored, or a garbage collection holding its lock
//! over a batch of deletions, waited for that. So what is removed is first
//! renamed into a trash folder under the root (one cheap, atomic rename: it
//! leaves the tree at once), and a thread of its own frees it afterwards.
//! A file about to be replaced by a rename gets a second link in the trash
//! first, so that the rename only drops a link. What a crash leaves in the
//! trash is freed when a driver next opens the root.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};

/// The trash folder's name under the root; the temporary-file prefix keeps
/// it out of listings and walks.
const TRASH_FOLDER: &str = ".dvcr-tmp-trash";

/// The trash of one driver root.
#[derive(Debug, Clone)]
pub(crate) struct Trash {
    folder: PathBuf,
}

impl Trash {
    /// The trash under `root`; what an earlier process left in it is queued
    /// for freeing.
    pub(crate) fn open(root: &Path) -> Trash {
        let trash = Trash {
            folder: root.join(TRASH_FOLDER),
        };
        if let Ok(entries) = fs::read_dir(&trash.folder) {
            for entry in entries.flatten() {
                free_later(entry.path());
            }
        }
        trash
    }

    /// Removes `path` (a file or a folder) from the tree at once and frees
    /// it later. A path that cannot be renamed into the trash is removed
    /// here.
    ///
    /// Small files, and folders holding only small files, are removed in
    /// place: for them the trash is one more rename and a wait for the
    /// freeing thread (`bench/gc.sh`, 2,000 blobs of 64 KiB: 0.45-0.48 s
    /// through the trash, 0.36-0.37 s in place).
    pub(crate) fn discard(&self, path: &Path) -> io::Result<()> {
        let metadata = fs::symlink_metadata(path)?;
        let remove_in_place = || if metadata.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
        if !holds_large_files(path, &metadata) {
            return remove_in_place();
        }
        let slot = self.slot();
        match fs::create_dir_all(&self.folder).and_then(|()| fs::rename(path, &slot)) {
            Ok(()) => {
                free_later(slot);
                Ok(())
            }
            Err(error) => {
                tracing::debug!(path = %path.display(), %error, "cannot move into the trash; removing in place");
                remove_in_place()
            }
        }
    }

    /// Gives the file at `target`, if it is a large one, a second link in
    /// the trash before a rename replaces it, so the rename does not free
    /// it.
    pub(crate) fn keep_until_replaced(&self, target: &Path) {
        // Nothing there to replace, a small file, or links refused: the
        // rename frees the old file itself.
        if !fs::symlink_metadata(target).is_ok_and(|metadata| is_large_file(&metadata)) {
            return;
        }
        let slot = self.slot();
        if fs::create_dir_all(&self.folder).and_then(|()| fs::hard_link(target, &slot)).is_ok() {
            free_later(slot);
        }
    }

    fn slot(&self) -> PathBuf {
        let suffix: u64 = rand::random();
        self.folder.join(format!("{suffix:016x}"))
    }

    /// Whether everything discarded so far has been freed.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        fs::read_dir(&self.folder).map_or(true, |mut entries| entries.next().is_none())
    }
}

/// The queue of the thread that frees trash, started on first use; `None`
/// when no thread could be started (trash is then freed in place).
static FREEING: LazyLock<Option<Mutex<mpsc::Sender<PathBuf>>>> = LazyLock::new(|| {
    let (sender, receiver) = mpsc::channel::<PathBuf>();
    let started = crate::bulk::spawn_bulk("dvcr-trash", move || {
        while let Ok(path) = receiver.recv() {
            free(&path);
            QUEUED.fetch_sub(1, Ordering::SeqCst);
        }
    });
    match started {
        Ok(()) => Some(Mutex::new(sender)),
        Err(error) => {
            tracing::warn!(%error, "cannot start the thread that frees removed files; they are freed in place");
            None
        }
    }
});

/// Paths queued for the freeing thread and not freed yet.
static QUEUED: AtomicUsize = AtomicUsize::new(0);

fn free_later(path: PathBuf) {
    QUEUED.fetch_add(1, Ordering::SeqCst);
    let queued = match FREEING.as_ref() {
        Some(queue) => queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .send(path)
            .map_err(|unsent| unsent.0),
        None => Err(path),
    };
    if let Err(path) = queued {
        QUEUED.fetch_sub(1, Ordering::SeqCst);
        free(&path);
    }
}

/// Blocks until everything queued so far in this process is freed: a
/// process about to exit (`dvcr gc`) gives the space back first, instead
/// of leaving it to the next start.
pub(crate) fn wait_until_freed() {
    while QUEUED.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn free(path: &Path) {
    if let Err(error) = free_entry(path) {
        if error.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), %error, "cannot free a removed file; it stays in the trash until the next start");
        }
    }
}

fn free_entry(path: &Path) -> io::Result<()> {
    let metadata = fs::symlink_metadata(path)?;
    if metadata.is_dir() {
        for entry in fs::read_dir(path)? {
            free_entry(&entry?.path())?;
        }
        return fs::remove_dir(path);
    }
    if is_large_file(&metadata) {
        shrink_unread(path);
    }
    fs::remove_file(path)
}

/// A file of more than one step: freeing it could hold the file system
/// for long.
fn is_large_file(metadata: &fs::Metadata) -> bool {
    metadata.is_file() && metadata.len() > FREE_STEP
}

/// Whether freeing `path` could hold the file system for long: a large
/// file, or a folder holding one or holding folders (a whole repository;
/// not looked into further).
fn holds_large_files(path: &Path, metadata: &fs::Metadata) -> bool {
    if !metadata.is_dir() {
        return is_large_file(metadata);
    }
    let Ok(entries) = fs::read_dir(path) else { return true };
    entries.flatten().any(|entry| match entry.metadata() {
        Ok(metadata) => metadata.is_dir() || is_large_file(&metadata),
        Err(_) => true,
    })
}

/// Bytes freed per step when a large file is shrunk before its unlink.
const FREE_STEP: u64 = 32 << 20;
/// Pause between steps, in which other transactions of the file system
/// commit.
const FREE_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// Frees a large file a step at a time, when nobody has it open: unlinked
/// whole, it holds the file system's journal until every extent is freed,
/// and every `fsync` of the registry meanwhile waits (93 ms for 1 GiB on
/// ext4 here, 6 ms in steps). A file that is open somewhere (a download
/// of a blob that was just replaced or collected) is left whole: its
/// reader keeps reading, and the last close frees it.
fn shrink_unread(path: &Path) {
    let Ok(file) = fs::OpenOptions::new().write(true).open(path) else { return };
    let Ok(metadata) = file.metadata() else { return };
    if std::os::unix::fs::MetadataExt::nlink(&metadata) != 1 || !lease_alone(&file) {
        return;
    }
    let mut size = metadata.len();
    // Someone opening the file meanwhile (a backup tool walking the
    // volume) breaks the lease: stop, so that their open waits one step,
    // not the kernel's lease-break time (45 s by default).
    while size > 0 && lease_held(&file) {
        size = size.saturating_sub(FREE_STEP);
        if file.set_len(size).is_err() {
            break;
        }
        std::thread::sleep(FREE_PAUSE);
    }
    release_lease(&file);
}

/// Takes a write lease on `file`: the kernel grants it only when no other
/// descriptor, in any process, has the file open, and while it is held an
/// open elsewhere waits. File systems without leases (NFS) refuse it, and
/// the file is then unlinked whole.
///
/// A lease break is announced with SIGIO, whose default action ends the
/// process: the signal is ignored first (nothing else in DVCR uses it).
#[cfg(target_os = "linux")]
fn lease_alone(file: &fs::File) -> bool {
    use std::os::fd::AsRawFd;
    static SIGIO_IGNORED: LazyLock<bool> = LazyLock::new(|| {
        // SAFETY: sets the disposition of one signal to "ignore"; no
        // handler code runs.
        unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) != libc::SIG_ERR }
    });
    if !*SIGIO_IGNORED {
        return false;
    }
    // SAFETY: fcntl on a descriptor this function borrows, with integer
    // arguments only.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) == 0 }
}

/// Whether the write lease is still held, not being broken by an open.
#[cfg(target_os = "linux")]
fn lease_held(file: &fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: as above.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) == libc::F_WRLCK }
}

#[cfg(target_os = "linux")]
fn release_lease(file: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: as above.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
}

#[cfg(not(target_os = "linux"))]
fn lease_alone(_file: &fs::File) -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
fn release_lease(_file: &fs::File) {}

#[cfg(not(target_os = "linux"))]
fn lease_held(_file: &fs::File) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emptied(trash: &Trash) -> bool {
        for _ in 0..500 {
            if trash.is_empty() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn discarded_files_and_folders_leave_the_tree_at_once_and_are_freed() {
        let root = tempfile::tempdir().unwrap();
        let trash = Trash::open(root.path());
        let folder = root.path().join("upload");
        fs::create_dir_all(folder.join("inner")).unwrap();
        fs::write(folder.join("inner/data"), vec![1u8; 1 << 20]).unwrap();
        let file = root.path().join("blob");
        fs::write(&file, b"blob").unwrap();

        trash.discard(&folder).unwrap();
        trash.discard(&file).unwrap();
        assert!(!folder.exists() && !file.exists());
        assert!(emptied(&trash), "the trash was not emptied");
        assert_eq!(trash.discard(&file).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_replaced_file_keeps_its_content_until_freed_and_the_new_one_is_in_place() {
        let root = tempfile::tempdir().unwrap();
        let trash = Trash::open(root.path());
        let (old, new) = (root.path().join("target"), root.path().join("incoming"));
        // Large enough to be kept by a link and shrunk in steps.
        fs::write(&old, b"old content").unwrap();
        fs::OpenOptions::new().write(true).open(&old).unwrap().set_len(2 * FREE_STEP).unwrap();
        fs::write(&new, b"new content").unwrap();
        let reader = fs::File::open(&old).unwrap();

        trash.keep_until_replaced(&old);
        fs::rename(&new, &old).unwrap();
        assert_eq!(fs::read(&old).unwrap(), b"new content");
        assert!(emptied(&trash), "the replaced file stayed in the trash");
        // A reader that had the old file open still reads it whole.
        let mut content = Vec::new();
        io::Read::read_to_end(&mut &reader, &mut content).unwrap();
        assert_eq!(content.len() as u64, 2 * FREE_STEP);
        assert!(content.starts_with(b"old content"));

        // A small file, or nothing to replace: no link is made and nothing
        // is left behind.
        trash.keep_until_replaced(&old);
        assert!(trash.is_empty());
        trash.keep_until_replaced(&root.path().join("missing"));
        assert!(trash.is_empty());
    }

    #[test]
    fn a_large_file_is_freed_in_steps_but_never_under_a_reader() {
        use std::os::unix::fs::FileExt;
        let root = tempfile::tempdir().unwrap();
        let trash = Trash::open(root.path());
        let large = |name: &str| {
            let path = root.path().join(name);
            let file = fs::File::create(&path).unwrap();
            file.set_len(3 * FREE_STEP).unwrap();
            file.write_all_at(b"end of the blob", 3 * FREE_STEP - 15).unwrap();
            path
        };

        let unread = large("unread");
        trash.discard(&unread).unwrap();
        assert!(emptied(&trash), "an unread large file was not freed");

        let read = large("read");
        let reader = fs::File::open(&read).unwrap();
        trash.discard(&read).unwrap();
        assert!(emptied(&trash), "a large file being read stayed in the trash");
        let mut end = [0u8; 15];
        reader.read_exact_at(&mut end, 3 * FREE_STEP - 15).unwrap();
        assert_eq!(&end, b"end of the blob");
        assert_eq!(reader.metadata().unwrap().len(), 3 * FREE_STEP);
    }

    #[test]
    fn opening_a_file_being_shrunk_stops_the_shrink_at_once_and_harms_nobody() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("large");
        let file = fs::File::create(&path).unwrap();
        file.set_len(4096 * FREE_STEP).unwrap();
        drop(file);
        let shrinking = {
            let path = path.clone();
            std::thread::spawn(move || shrink_unread(&path))
        };
        // 4096 steps take over 8 s; an open meanwhile must not wait for
        // them, nor for the kernel's lease-break time, nor end the process
        // with the SIGIO that announces the break.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let opened_at = std::time::Instant::now();
        let opened = fs::File::open(&path).unwrap();
        assert!(opened_at.elapsed() < std::time::Duration::from_secs(2), "the open waited {:?}", opened_at.elapsed());
        shrinking.join().unwrap();
        let left = opened.metadata().unwrap().len();
        assert!(left > 0 && left < 4096 * FREE_STEP, "the shrink did not start, or did not stop: {left} bytes left");
    }

    #[test]
    fn what_an_earlier_process_left_in_the_trash_is_freed_on_open() {
        let root = tempfile::tempdir().unwrap();
        let left = root.path().join(TRASH_FOLDER).join("0123456789abcdef");
        fs::create_dir_all(&left).unwrap();
        fs::write(left.join("data"), b"left behind").unwrap();
        let trash = Trash::open(root.path());
        assert!(emptied(&trash), "the trash left by a crash was not freed");
    }
}
