//! Content-addressed blob store for raw messages and attachments under the data dir.
//!
//! Layout: `blobs/sha256/ab/abcdef…` (the full hex digest). A blob is written to `tmp/`, fsynced,
//! renamed into place and its directory fsynced, so once [`RawStore::put`] returns the bytes
//! survive a crash. Writing the same bytes twice is a no-op. A blob no record refers to (a crash
//! between write and registry commit) is harmless.
//!
//! For a batch of messages committed together, [`RawStore::stage`] writes blobs to `tmp/` without
//! waiting for the disk, and [`RawStore::publish`] makes all of them durable at once (one
//! filesystem sync, the renames, a second sync), so a batch costs two flushes instead of two per
//! blob. Either way a blob's final name exists only after its bytes reached the disk.
//!
//! A message too large to hold in memory is written piece by piece by a [`BlobWriter`], hashed
//! as it goes, and published like a single blob once its last piece is written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::failpoint;

/// A SHA-256 digest, shown as lower-case hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    pub fn of(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest(Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Sha256Digest> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Sha256Digest(out))
    }
}

impl std::fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("raw store: cannot {action} {}: {source}", path.display())]
pub struct StoreError {
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

/// One stored blob.
#[derive(Debug, Clone)]
pub struct BlobInfo {
    pub digest: Sha256Digest,
    pub path: PathBuf,
    pub size: u64,
    pub age: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct RawStore {
    root: PathBuf,
}

impl RawStore {
    /// Opens (creating if needed) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<RawStore, StoreError> {
        let store = RawStore {
            root: data_dir.to_owned(),
        };
        for dir in [store.blobs_dir(), store.tmp_dir()] {
            fs::create_dir_all(&dir).map_err(|source| StoreError {
                action: "create directory",
                path: dir.clone(),
                source,
            })?;
        }
        store.create_fan_out()?;
        store.remove_abandoned_temp_files();
        Ok(store)
    }

    /// Creates the 256 fan-out directories (`blobs/sha256/00` … `ff`) that are missing, and makes
    /// their entries durable, once at open: storing a blob is then one rename, without a
    /// directory check per blob (measured: a `statx` and a `mkdir` attempt per blob, 4% of a
    /// helpdesk run's CPU).
    fn create_fan_out(&self) -> Result<(), StoreError> {
        let root = self.blobs_dir();
        let mut created = false;
        for byte in 0..=255u8 {
            let dir = root.join(hex::encode([byte]));
            match fs::create_dir(&dir) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(StoreError {
                        action: "create directory",
                        path: dir,
                        source,
                    });
                }
            }
        }
        if created {
            sync_dir(&root).map_err(|source| StoreError {
                action: "fsync directory",
                path: root,
                source,
            })?;
        }
        Ok(())
    }

    /// Renames a written blob to its final name. Its fan-out directory exists since
    /// [`RawStore::open`]; if it was removed meanwhile, it is created again (durably) and the
    /// rename repeated.
    fn rename_into_place(&self, tmp: &Path, dest: &Path) -> io::Result<()> {
        match fs::rename(tmp, dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tmp.exists() => {
                let dir = dest.parent().unwrap_or(dest);
                fs::create_dir_all(dir)?;
                sync_dir(&self.blobs_dir())?;
                fs::rename(tmp, dest)
            }
            other => other,
        }
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn path_of(&self, digest: &Sha256Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.blobs_dir().join(&hex[..2]).join(hex)
    }

    /// Stores `bytes` durably and returns their digest.
    pub fn put(&self, bytes: &[u8]) -> Result<Sha256Digest, StoreError> {
        let digest = Sha256Digest::of(bytes);
        self.put_with_digest(bytes, digest)?;
        Ok(digest)
    }

    /// Stores bytes whose digest the caller already computed.
    pub fn put_with_digest(&self, bytes: &[u8], digest: Sha256Digest) -> Result<(), StoreError> {
        let dest = self.path_of(&digest);
        if already_stored(&dest, bytes.len() as u64) {
            return Ok(());
        }
        let tmp = self.tmp_path(&digest.to_hex());
        let written = (|| -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError {
                action: "write",
                path: tmp,
                source,
            });
        }
        self.place(&tmp, &dest).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// Gives a flushed temp file its blob's name and flushes the directory: after this, the
    /// blob survives a crash. (Staged blobs are placed together by [`RawStore::publish`].)
    fn place(&self, tmp: &Path, dest: &Path) -> Result<(), StoreError> {
        self.rename_into_place(tmp, dest)
            .map_err(|source| StoreError {
                action: "rename into place",
                path: dest.to_owned(),
                source,
            })?;
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
        sync_dir(&dir).map_err(|source| StoreError {
            action: "fsync directory",
            path: dir,
            source,
        })
    }

    /// Starts a set of blobs to be made durable together by [`RawStore::publish`].
    pub fn staging(&self) -> Result<Staged, StoreError> {
        let dir = self.tmp_dir();
        // Opened before any write: a filesystem sync through it reports every writeback error
        // that happens from now on.
        let dir_handle = File::open(&dir).map_err(|source| StoreError {
            action: "open",
            path: dir,
            source,
        })?;
        Ok(Staged {
            dir_handle,
            files: Vec::new(),
        })
    }

    /// Writes `bytes` to `tmp/` and starts their writeback without waiting for it. Not durable
    /// and not visible under the final name until [`RawStore::publish`].
    pub fn stage(
        &self,
        bytes: &[u8],
        digest: Sha256Digest,
        staged: &mut Staged,
    ) -> Result<(), StoreError> {
        let dest = self.path_of(&digest);
        if already_stored(&dest, bytes.len() as u64) {
            return Ok(());
        }
        let tmp = self.tmp_path(&digest.to_hex());
        let written = (|| -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            if bytes.len() >= DIRECT_WRITE_BYTES && write_direct(&mut f, bytes)? {
                return Ok(());
            }
            f.write_all(bytes)?;
            if bytes.len() >= EARLY_WRITEBACK_BYTES {
                start_writeback(&f);
            }
            Ok(())
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError {
                action: "write",
                path: tmp,
                source,
            });
        }
        staged.files.push((tmp, dest));
        Ok(())
    }

    /// Makes every staged blob durable under its final name: flush, rename, flush.
    pub fn publish(&self, mut staged: Staged) -> Result<(), StoreError> {
        if staged.files.is_empty() {
            return Ok(());
        }
        let tmp_dir = self.tmp_dir();
        sync_filesystem(&staged.dir_handle, staged.files.iter().map(|(tmp, _)| tmp)).map_err(
            |source| StoreError {
                action: "flush staged blobs in",
                path: tmp_dir.clone(),
                source,
            },
        )?;
        let mut dirs = Vec::new();
        while let Some((tmp, dest)) = staged.files.pop() {
            let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
            if let Err(source) = self.rename_into_place(&tmp, &dest) {
                let _ = fs::remove_file(&tmp);
                return Err(StoreError {
                    action: "rename into place",
                    path: dest,
                    source,
                });
            }
            dirs.push(dir);
        }
        dirs.sort();
        dirs.dedup();
        sync_filesystem(&staged.dir_handle, dirs.iter()).map_err(|source| StoreError {
            action: "flush the directories of blobs renamed from",
            path: tmp_dir,
            source,
        })
    }

    /// Starts a blob whose bytes arrive piece by piece ([`BlobWriter::write`]); its digest is
    /// known, and its name given, only at [`BlobWriter::finish`].
    pub fn writer(&self) -> Result<BlobWriter, StoreError> {
        let tmp = self.tmp_path("pieces");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|source| StoreError {
                action: "create",
                path: tmp.clone(),
                source,
            })?;
        // Such blobs are large (a message fetched in parts, an attachment decoded in pieces):
        // they bypass the page cache, as large staged blobs do, where the filesystem allows.
        let direct = match DirectBuffer::enable(&file, DIRECT_CHUNK) {
            Ok(direct) => direct.map(Box::new),
            Err(source) => {
                let _ = fs::remove_file(&tmp);
                return Err(StoreError {
                    action: "open for direct I/O",
                    path: tmp,
                    source,
                });
            }
        };
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            len: 0,
            done: false,
            direct,
        })
    }

    /// Deletes temp files left by a process that no longer runs (a worker killed while writing
    /// or staging). Their bytes were never published, so nothing refers to them. Files of
    /// running processes (another worker on the same data dir) are left alone.
    fn remove_abandoned_temp_files(&self) {
        let Ok(entries) = fs::read_dir(self.tmp_dir()) else {
            return;
        };
        let own = std::process::id();
        // Blobs a gc moved aside and did not put back (it was killed) go back to their place,
        // but only while no gc runs: a running gc holds the lock and finishes its own. Whether
        // it runs is asked of the lock, not of its pid (in a container gc may well be pid 1).
        let entries: Vec<_> = entries.flatten().collect();
        let aside = |e: &fs::DirEntry| e.file_name().to_string_lossy().ends_with(ASIDE_SUFFIX);
        let gc_idle = entries
            .iter()
            .any(aside)
            .then(|| self.lock_for_gc().ok())
            .flatten();
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name.strip_suffix(ASIDE_SUFFIX) {
                if let (Some(_), Some(digest)) = (
                    &gc_idle,
                    hex.split('.').next().and_then(Sha256Digest::from_hex),
                ) {
                    // It may have been a blob a worker was reusing: it comes back young.
                    let _ = put_back(&entry.path(), &self.path_of(&digest), true);
                }
                continue;
            }
            let Some(pid) = name.split('.').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid != own && !process_is_running(pid) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Taken by `registry gc --delete` for its whole run (an advisory lock on `tmp/gc.lock`,
    /// released by the kernel if gc dies): one gc at a time, and [`RawStore::open`] leaves the
    /// blobs a running gc has moved aside alone.
    pub fn lock_for_gc(&self) -> Result<GcLock, StoreError> {
        let path = self.tmp_dir().join(GC_LOCK);
        let err = |action, source| StoreError {
            action,
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| err("open", e))?;
        match file.try_lock() {
            Ok(()) => Ok(GcLock(file)),
            Err(fs::TryLockError::WouldBlock) => Err(err(
                "lock (another `registry gc` is running on this data dir)",
                io::Error::from(io::ErrorKind::WouldBlock),
            )),
            Err(fs::TryLockError::Error(e)) => Err(err("lock", e)),
        }
    }

    /// A new temp file name, `<label>.<pid>.<random>`: the pid is what
    /// [`RawStore::remove_abandoned_temp_files`] goes by.
    fn tmp_path(&self, label: &str) -> PathBuf {
        self.tmp_dir().join(format!(
            "{label}.{}.{}",
            std::process::id(),
            rand::random::<u32>()
        ))
    }

    /// Deletes the blob `digest` if it is at least `min_age` old, never one a worker has just
    /// decided to reuse. A worker reusing a stored blob sets its time to now and then checks
    /// that it is still in place ([`already_stored`]); gc first moves the blob aside (an atomic
    /// rename into `tmp/`), then reads its age: young, it is put back; old, it is deleted. A
    /// worker that set the time before the move makes gc put it back; one that set it after
    /// finds it gone and writes it again. Either way no record refers to a deleted blob.
    pub fn remove_if_old(
        &self,
        _gc: &GcLock,
        digest: &Sha256Digest,
        min_age: std::time::Duration,
    ) -> Result<Removal, StoreError> {
        let Some(aside) = self.set_aside(digest)? else {
            return Ok(Removal::Gone);
        };
        // A blob moved aside, its age not yet read; `gc-aside` kills gc here (crash tests).
        failpoint::hit("gc-aside");
        aside.remove_if_old(min_age)
    }

    /// Moves a blob out of its place into `tmp/`, where a later [`RawStore::open`] puts it back
    /// if this process dies (its gc lock goes with it). `None`: it is not there.
    fn set_aside(&self, digest: &Sha256Digest) -> Result<Option<Aside>, StoreError> {
        let path = self.path_of(digest);
        let aside = self.tmp_dir().join(format!(
            "{}.{}.{ASIDE_SUFFIX}",
            digest.to_hex(),
            std::process::id()
        ));
        match fs::rename(&path, &aside) {
            Ok(()) => Ok(Some(Aside { path, aside })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError {
                action: "move aside",
                path,
                source,
            }),
        }
    }

    /// Every blob in the store with its size and age, for garbage collection.
    pub fn list(&self) -> Result<Vec<BlobInfo>, StoreError> {
        let mut out = Vec::new();
        let root = self.blobs_dir();
        let read = |dir: &Path| {
            fs::read_dir(dir).map_err(|source| StoreError {
                action: "list",
                path: dir.to_owned(),
                source,
            })
        };
        for fan in read(&root)? {
            let fan = fan.map_err(|source| StoreError {
                action: "list",
                path: root.clone(),
                source,
            })?;
            if !fan.path().is_dir() {
                continue;
            }
            for entry in read(&fan.path())? {
                let Ok(entry) = entry else { continue };
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(digest) = Sha256Digest::from_hex(&name) else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else { continue };
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .unwrap_or_default();
                out.push(BlobInfo {
                    digest,
                    path: entry.path(),
                    size: meta.len(),
                    age,
                });
            }
        }
        out.sort_by_key(|b| b.digest);
        Ok(out)
    }

    /// Reads a blob through (1 MiB at a time, whatever its size) and says whether it is there
    /// with `size` bytes that still have its digest: the fixity check of `registry verify`.
    pub fn check(&self, digest: &Sha256Digest, size: u64) -> Result<BlobCheck, StoreError> {
        let path = self.path_of(digest);
        let err = |source| StoreError {
            action: "check",
            path: path.clone(),
            source,
        };
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BlobCheck::Missing),
            Err(e) => return Err(err(e)),
        };
        let len = file.metadata().map_err(err)?.len();
        if len != size {
            return Ok(BlobCheck::WrongSize(len));
        }
        let found = hash_through(&mut file, err, |_| Ok(()))?;
        Ok(if found == *digest {
            BlobCheck::Intact
        } else {
            BlobCheck::Altered(found)
        })
    }

    /// Reads a blob back and checks that its bytes still have its digest.
    pub fn get_verified(&self, digest: &Sha256Digest) -> Result<Vec<u8>, StoreError> {
        let bytes = self.get(digest)?;
        let found = Sha256Digest::of(&bytes);
        if found != *digest {
            return Err(self.altered(digest, found));
        }
        Ok(bytes)
    }

    /// The error of a blob whose bytes now have the digest `found`.
    fn altered(&self, digest: &Sha256Digest, found: Sha256Digest) -> StoreError {
        StoreError {
            action: "verify",
            path: self.path_of(digest),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("its bytes now have SHA-256 {found}"),
            ),
        }
    }

    /// Copies a blob into `out` a MiB at a time, hashing it on the way, and returns its length.
    /// Bytes that no longer have the blob's digest are an error *after* they were written: the
    /// caller removes what it wrote. Memory stays at one buffer, whatever the blob's size.
    pub fn copy_verified(
        &self,
        digest: &Sha256Digest,
        out: &mut impl io::Write,
    ) -> Result<u64, StoreError> {
        let path = self.path_of(digest);
        let err = |action, source| StoreError {
            action,
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(|e| err("read", e))?;
        let mut len = 0u64;
        let found = hash_through(
            &mut file,
            |e| err("read", e),
            |piece| {
                out.write_all(piece).map_err(|e| err("copy", e))?;
                len += piece.len() as u64;
                Ok(())
            },
        )?;
        if found != *digest {
            return Err(self.altered(digest, found));
        }
        Ok(len)
    }

    /// Reads a blob back.
    pub fn get(&self, digest: &Sha256Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(digest);
        fs::read(&path).map_err(|source| StoreError {
            action: "read",
            path,
            source,
        })
    }
}

/// Whether a blob of this length is already stored under `dest`; if so its modification time is
/// set to now. `registry gc` deletes only unreferenced blobs older than its minimum age, so an
/// old orphan (a crash between write and commit, long ago) that a new message is about to refer
/// to must look new, or gc could delete it between this check and the commit. A blob whose time
/// cannot be set (removed meanwhile) counts as not stored and is written again.
///
/// Against `gc` ([`RawStore::remove_if_old`], which moves a blob aside before it reads its age)
/// the blob must still be in place, the same file, after its time is set: if it was moved
/// aside before that, gc may have read the old time and deletes it, so it is written again.
fn already_stored(dest: &Path, len: u64) -> bool {
    let Ok(meta) = fs::metadata(dest) else {
        return false;
    };
    if meta.len() != len {
        return false;
    }
    let touched = OpenOptions::new()
        .write(true)
        .open(dest)
        .and_then(|f| touch_in_place(&f, dest));
    matches!(touched, Ok(true))
}

/// Sets the time of the opened blob `f` to now; `true` if it is still the file at `dest`.
fn touch_in_place(f: &File, dest: &Path) -> io::Result<bool> {
    f.set_modified(std::time::SystemTime::now())?;
    Ok(same_file(&f.metadata()?, &fs::metadata(dest)?))
}

#[cfg(unix)]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

#[cfg(not(unix))]
fn same_file(_: &fs::Metadata, _: &fs::Metadata) -> bool {
    true
}

/// Reads `file` to its end a MiB at a time, hands each piece to `each`, and returns the SHA-256
/// of what was read; a read error goes through `read_error`, and `each`'s error stops it.
fn hash_through<E>(
    file: &mut File,
    read_error: impl Fn(io::Error) -> E,
    mut each: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<Sha256Digest, E> {
    use std::io::Read;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1024 * 1024];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e)),
        };
        hasher.update(&buffer[..n]);
        each(&buffer[..n])?;
    }
    Ok(Sha256Digest(hasher.finalize().into()))
}

/// What [`RawStore::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobCheck {
    Intact,
    Missing,
    /// There, with this many bytes instead of the recorded size.
    WrongSize(u64),
    /// There, with the recorded size, but its bytes have another digest.
    Altered(Sha256Digest),
}

/// What [`RawStore::remove_if_old`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Deleted; it had this many bytes.
    Removed(u64),
    /// Younger than the minimum age (a worker reused it meanwhile): left in place.
    Young,
    /// Not there (deleted or never stored).
    Gone,
}

/// Suffix of a blob moved aside by `gc` in `tmp/`: restored, not deleted, if gc died there.
const ASIDE_SUFFIX: &str = "gc";

/// A blob moved aside by [`RawStore::set_aside`]: `path` is its place, `aside` where it is.
struct Aside {
    path: PathBuf,
    aside: PathBuf,
}

impl Aside {
    /// Deletes it if it is at least `min_age` old; puts it back otherwise.
    fn remove_if_old(self, min_age: std::time::Duration) -> Result<Removal, StoreError> {
        let Aside { path, aside } = self;
        let meta = fs::metadata(&aside).map_err(|source| StoreError {
            action: "read the age of",
            path: aside.clone(),
            source,
        });
        let age = meta
            .as_ref()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|m| m.elapsed().ok());
        match (meta, age) {
            (Ok(meta), Some(age)) if age >= min_age => {
                fs::remove_file(&aside).map_err(|source| StoreError {
                    action: "delete",
                    path: aside,
                    source,
                })?;
                Ok(Removal::Removed(meta.len()))
            }
            // Young (or its age unreadable): back where it was. Bytes a worker wrote there
            // meanwhile are the same bytes.
            (meta, _) => {
                put_back(&aside, &path, false).map_err(|source| StoreError {
                    action: "put back",
                    path: path.clone(),
                    source,
                })?;
                meta.map(|_| Removal::Young)
            }
        }
    }
}

/// Puts a blob moved aside back in its place, never over a file there: a worker that found the
/// place empty meanwhile has written and published the same bytes, perhaps already referred to
/// by a record, and an older copy must not replace it (it would look old to the next gc).
/// `young`: set its time to now first, as a worker reusing it would have.
fn put_back(aside: &Path, path: &Path, young: bool) -> io::Result<()> {
    if young {
        OpenOptions::new()
            .write(true)
            .open(aside)?
            .set_modified(std::time::SystemTime::now())?;
    }
    match fs::hard_link(aside, path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        // A filesystem without hard links: moved back, unless something is there meanwhile.
        Err(_) if !path.exists() => fs::rename(aside, path)?,
        Err(e) => return Err(e),
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    match fs::remove_file(aside) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Held by a running `registry gc --delete` (see [`RawStore::lock_for_gc`]).
pub struct GcLock(#[allow(dead_code)] File);

/// The gc lock's file in `tmp/` (no pid in its name: never taken for an abandoned temp file).
const GC_LOCK: &str = "gc.lock";

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Blobs written to `tmp/` by [`RawStore::stage`], not yet published. Dropping it removes
/// whatever was not published (an error or a shutdown in between leaves no temp files).
pub struct Staged {
    dir_handle: File,
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    /// Takes over the blobs staged in `other` (each preparation stages on its own).
    pub fn absorb(&mut self, mut other: Staged) {
        self.files.append(&mut other.files);
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in self.files.drain(..) {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// A blob written piece by piece (see [`RawStore::writer`]). Nothing is visible under a blob's
/// name before [`BlobWriter::finish`] returns; dropped before that, it leaves no file behind (a
/// killed process's temp file is removed by the next [`RawStore::open`]).
pub struct BlobWriter {
    store: RawStore,
    tmp: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    len: u64,
    /// Renamed into place: nothing left to remove.
    done: bool,
    /// While the file bypasses the page cache: the bytes not yet written.
    direct: Option<Box<DirectBuffer>>,
}

impl BlobWriter {
    /// Appends `piece` to the blob and to its digest, and starts its writeback (buffered) or
    /// writes each whole chunk as it fills (direct).
    pub fn write(&mut self, piece: &[u8]) -> Result<(), StoreError> {
        let Some(file) = self.file.as_mut() else {
            return Err(self.error("write", io::ErrorKind::BrokenPipe.into()));
        };
        let written = match &mut self.direct {
            Some(direct) => direct.write(file, piece),
            None => file.write_all(piece).map(|()| {
                start_writeback(file);
                Ok(())
            }),
        };
        match written {
            Ok(Ok(())) => {}
            // Direct I/O refused after all: what is held is written, buffered, from now on.
            Ok(Err(held)) => {
                self.direct = None;
                if let Err(source) = file.write_all(&held) {
                    self.file = None;
                    return Err(self.error("write", source));
                }
            }
            Err(source) => {
                // Nothing more goes into this blob: how much of the piece got out is unknown.
                self.file = None;
                return Err(self.error("write", source));
            }
        }
        self.hasher.update(piece);
        self.len += piece.len() as u64;
        Ok(())
    }

    /// Writes what direct I/O still holds (the last, partial chunk) and cuts the padding off.
    fn flush_direct(&mut self, file: &mut File) -> Result<(), StoreError> {
        let Some(mut direct) = self.direct.take() else {
            return Ok(());
        };
        match direct.finish(file, self.len) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(held)) => file
                .write_all(&held)
                .map_err(|source| self.error("write", source)),
            Err(source) => Err(self.error("write", source)),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the blob durable under its digest (flush, rename, flush of its directory), or,
    /// when the same bytes are stored already, keeps that blob and drops this copy unflushed.
    /// Returns the digest and the length.
    pub fn finish(mut self) -> Result<(Sha256Digest, u64), StoreError> {
        let (file, digest, dest) = self.seal("finish")?;
        if let Some(file) = file {
            if let Err(source) = file.sync_all() {
                return Err(self.error("write", source));
            }
            drop(file);
            self.store.place(&self.tmp, &dest)?;
            self.done = true;
        }
        Ok((digest, self.len))
    }

    /// Like [`BlobWriter::finish`], but into `staged`: made durable and given its name by
    /// [`RawStore::publish`] with the rest of the batch. Returns the digest and the length.
    pub fn stage(mut self, staged: &mut Staged) -> Result<(Sha256Digest, u64), StoreError> {
        let (file, digest, dest) = self.seal("stage")?;
        if let Some(file) = file {
            drop(file);
            staged.files.push((self.tmp.clone(), dest));
            // The temp file is the staged set's now (removed by it unless published).
            self.done = true;
        }
        Ok((digest, self.len))
    }

    /// The end of writing, for [`BlobWriter::finish`] and [`BlobWriter::stage`]: writes what
    /// direct I/O still holds and names the blob. Returns the file (`None` when the same bytes
    /// are stored already: this copy is dropped, unflushed), the digest and the final path.
    fn seal(
        &mut self,
        action: &'static str,
    ) -> Result<(Option<File>, Sha256Digest, PathBuf), StoreError> {
        let Some(mut file) = self.file.take() else {
            return Err(self.error(action, io::ErrorKind::BrokenPipe.into()));
        };
        self.flush_direct(&mut file)?;
        let digest = Sha256Digest(std::mem::take(&mut self.hasher).finalize().into());
        let dest = self.store.path_of(&digest);
        let file = (!already_stored(&dest, self.len)).then_some(file);
        Ok((file, digest, dest))
    }

    fn error(&self, action: &'static str, source: io::Error) -> StoreError {
        StoreError {
            action,
            path: self.tmp.clone(),
            source,
        }
    }
}

impl Drop for BlobWriter {
    /// Removes the temp file unless it was renamed into place.
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Whether a process with this id exists (on Linux, `/proc/<pid>`; elsewhere assumed running).
fn process_is_running(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Staged blobs at least this large bypass the page cache (`O_DIRECT`): the kernel's copy into
/// freshly allocated page-cache pages was the largest single cost of ingesting large mail.
const DIRECT_WRITE_BYTES: usize = 64 * 1024;

/// `O_DIRECT` needs block-aligned memory, offsets and lengths.
const DIRECT_ALIGN: usize = 4096;
const DIRECT_CHUNK: usize = 4 * 1024 * 1024;

/// Bounce buffers kept between direct writes, shared by every thread: a write takes one and
/// gives it back. One per thread instead (as before) cost a 4 MiB buffer, zeroed, for every
/// message whose raw blob is written beside its parse (a thread of its own each time), and held
/// one per blocking thread that ever wrote: 18 MiB of the e-filing benchmark's peak heap.
static DIRECT_BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Buffers kept for reuse; a write that finds none allocates one. Writes at once are few: the
/// preparation, its raw blob's writer, a large message fetched in parts.
const DIRECT_BUFFERS_KEPT: usize = 2;

fn direct_buffers() -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    DIRECT_BUFFERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A kept bounce buffer, or a new (empty) one.
fn take_direct_buffer() -> Vec<u8> {
    direct_buffers().pop().unwrap_or_default()
}

/// Keeps `buffer` for the next direct write, unless enough are kept.
fn keep_direct_buffer(buffer: Vec<u8>) {
    let mut kept = direct_buffers();
    if kept.len() < DIRECT_BUFFERS_KEPT {
        kept.push(buffer);
    }
}

/// A [`BlobWriter`]'s bytes on their way to a file opened for direct I/O: they collect in an
/// aligned chunk of a bounce buffer, which is written whenever it is full.
struct DirectBuffer {
    buffer: Vec<u8>,
    /// Where the aligned chunk starts in `buffer`, and its length (a multiple of the block).
    skew: usize,
    chunk_len: usize,
    filled: usize,
    /// Bytes of the file written whole chunks so far: where the chunk being filled belongs.
    written: u64,
}

/// What a write refused with `EINVAL` under direct I/O leaves: the file is buffered again,
/// and these bytes (not yet written, in order) are the caller's to write.
type Held = Vec<u8>;

impl DirectBuffer {
    /// Turns direct I/O on for `file`, new and empty: `None` if the filesystem refuses it.
    /// `expected`: how many bytes will come at most; a small blob gets a chunk of its size.
    fn enable(file: &File, expected: usize) -> io::Result<Option<DirectBuffer>> {
        if !set_direct(file, true)? {
            return Ok(None);
        }
        let chunk_len = expected
            .div_ceil(DIRECT_ALIGN)
            .clamp(1, DIRECT_CHUNK / DIRECT_ALIGN)
            * DIRECT_ALIGN;
        let mut buffer = take_direct_buffer();
        if buffer.len() < chunk_len + DIRECT_ALIGN {
            buffer.reserve_exact(chunk_len + DIRECT_ALIGN - buffer.len());
            buffer.resize(chunk_len + DIRECT_ALIGN, 0);
        }
        let skew = buffer.as_ptr().align_offset(DIRECT_ALIGN);
        Ok(Some(DirectBuffer {
            buffer,
            skew,
            chunk_len,
            filled: 0,
            written: 0,
        }))
    }

    fn chunk(&mut self) -> &mut [u8] {
        &mut self.buffer[self.skew..self.skew + self.chunk_len]
    }

    /// Adds `piece`, writing each chunk that fills. `Ok(Err(held))`: direct I/O was refused.
    fn write(&mut self, file: &mut File, mut piece: &[u8]) -> io::Result<Result<(), Held>> {
        while !piece.is_empty() {
            let n = (self.chunk_len - self.filled).min(piece.len());
            let filled = self.filled;
            self.chunk()[filled..filled + n].copy_from_slice(&piece[..n]);
            self.filled += n;
            piece = &piece[n..];
            if self.filled == self.chunk_len {
                if let Err(e) = file.write_all(self.chunk()) {
                    return self.refused(file, e, piece);
                }
                self.filled = 0;
                self.written += self.chunk_len as u64;
            }
        }
        Ok(Ok(()))
    }

    /// Writes the last chunk, padded to the block size, and cuts the file to `len`.
    fn finish(&mut self, file: &mut File, len: u64) -> io::Result<Result<(), Held>> {
        if self.filled > 0 {
            let filled = self.filled;
            let padded = filled.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            self.chunk()[filled..padded].fill(0);
            if let Err(e) = file.write_all(&self.chunk()[..padded]) {
                return self.refused(file, e, &[]);
            }
            self.filled = 0;
            file.set_len(len)?;
        }
        Ok(Ok(()))
    }

    /// A direct write failed: `EINVAL` (the filesystem wants another alignment after all)
    /// turns direct I/O off and hands back what was held and what was left of the piece.
    /// Whole chunks written before stay; whatever part of this chunk got out before the refusal
    /// is cut off, so that the held bytes go where this chunk began.
    fn refused(&mut self, file: &File, e: io::Error, rest: &[u8]) -> io::Result<Result<(), Held>> {
        use std::io::{Seek, SeekFrom};
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        set_direct(file, false)?;
        file.set_len(self.written)?;
        (&mut &*file).seek(SeekFrom::Start(self.written))?;
        let skew = self.skew;
        let mut held = self.buffer[skew..skew + self.filled].to_vec();
        held.extend_from_slice(rest);
        self.filled = 0;
        Ok(Err(held))
    }
}

impl Drop for DirectBuffer {
    fn drop(&mut self) {
        keep_direct_buffer(std::mem::take(&mut self.buffer));
    }
}

/// Turns direct I/O on or off for `file`. `Ok(false)`: the filesystem refuses to turn it on
/// (setting the flag creates nothing, so such a file is as it was).
#[cfg(target_os = "linux")]
fn set_direct(file: &File, on: bool) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor we own; F_GETFL/F_SETFL pass no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        let e = io::Error::last_os_error();
        return if on && e.raw_os_error() == Some(libc::EINVAL) {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
fn set_direct(_file: &File, on: bool) -> io::Result<bool> {
    Ok(!on)
}

/// Writes `bytes` to the new, empty file `f` without the page cache, through a
/// [`DirectBuffer`]. `Ok(false)`: the filesystem does not do direct I/O, or refused it after
/// all (e.g. stricter alignment); nothing was written and `f` is as it was (empty, at offset 0,
/// buffered), so the caller writes normally.
fn write_direct(f: &mut File, bytes: &[u8]) -> io::Result<bool> {
    use std::io::{Seek, SeekFrom};
    let Some(mut direct) = DirectBuffer::enable(f, bytes.len())? else {
        return Ok(false);
    };
    let done = match direct.write(f, bytes)? {
        Ok(()) => direct.finish(f, bytes.len() as u64)?,
        refused => refused,
    };
    if done.is_err() {
        // Refused: start over, buffered (direct I/O is off again).
        f.set_len(0)?;
        f.seek(SeekFrom::Start(0))?;
        return Ok(false);
    }
    Ok(true)
}

/// Blobs at least this large start their writeback as soon as they are staged; smaller ones
/// wait for the one flush at publish time (a separate tiny I/O each would cost more).
const EARLY_WRITEBACK_BYTES: usize = 1024 * 1024;

/// Asks the kernel to start writing a file's dirty pages now, so that the flush at publish time
/// finds most of them on disk already. Advisory: errors surface at the flush.
#[cfg(target_os = "linux")]
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range(2) on an open descriptor we own, whole file, no memory passed.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_f: &File) {}

/// Flushes the filesystem holding `handle` (Linux: one `syncfs`, which since Linux 5.8 also
/// reports writeback errors seen since `handle` was opened). Elsewhere, each path is fsynced.
#[cfg(target_os = "linux")]
fn sync_filesystem<'a>(handle: &File, _paths: impl Iterator<Item = &'a PathBuf>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs(2) on an open descriptor we own; no memory passed.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn sync_filesystem<'a>(_handle: &File, paths: impl Iterator<Item = &'a PathBuf>) -> io::Result<()> {
    for path in paths {
        File::open(path)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_blob_written_in_pieces_is_stored_under_the_digest_of_all_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let whole: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut writer = store.writer().unwrap();
        for piece in whole.chunks(65_536) {
            writer.write(piece).unwrap();
        }
        assert_eq!(writer.len(), whole.len() as u64);
        assert_eq!(
            temp_files(dir.path()).len(),
            1,
            "written beside, not in place"
        );
        let (digest, len) = writer.finish().unwrap();
        assert_eq!(digest, Sha256Digest::of(&whole));
        assert_eq!(len, whole.len() as u64);
        assert_eq!(fs::read(store.path_of(&digest)).unwrap(), whole);
        assert!(temp_files(dir.path()).is_empty());

        // The same bytes again: the stored blob stays, the copy goes.
        let mut again = store.writer().unwrap();
        again.write(&whole).unwrap();
        assert_eq!(again.finish().unwrap().0, digest);
        assert!(temp_files(dir.path()).is_empty());
        assert_eq!(store.get(&digest).unwrap(), whole);
    }

    /// Pieces across direct I/O's chunks and blocks: a byte, the rest of a block, a whole
    /// chunk, odd sizes, and a tail that is not a whole block.
    fn odd_pieces(whole: &[u8]) -> Vec<&[u8]> {
        let mut pieces = Vec::new();
        let mut rest = whole;
        for n in [
            1,
            4095,
            DIRECT_CHUNK,
            3 * 1024 * 1024 + 7,
            1,
            DIRECT_CHUNK - 9,
        ] {
            let (piece, tail) = rest.split_at(n.min(rest.len()));
            pieces.push(piece);
            rest = tail;
        }
        pieces.push(rest);
        pieces
    }

    #[test]
    fn a_large_blob_in_odd_pieces_is_written_byte_exact_finished_or_staged() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let whole: Vec<u8> = (0..(3 * DIRECT_CHUNK + 12_345))
            .map(|i| (i % 253) as u8)
            .collect();
        let mut writer = store.writer().unwrap();
        // Where the filesystem allows it (ext4 does), the page cache is bypassed.
        eprintln!("direct I/O: {}", writer.direct.is_some());
        for piece in odd_pieces(&whole) {
            writer.write(piece).unwrap();
        }
        let (digest, len) = writer.finish().unwrap();
        assert_eq!(
            (digest, len),
            (Sha256Digest::of(&whole), whole.len() as u64)
        );
        assert!(store.get_verified(&digest).unwrap() == whole);
        assert!(temp_files(dir.path()).is_empty());

        // Staged: in place only once published, then byte-exact.
        let other: Vec<u8> = whole.iter().map(|b| b ^ 0x5a).collect();
        let mut staged = store.staging().unwrap();
        let mut writer = store.writer().unwrap();
        for piece in odd_pieces(&other) {
            writer.write(piece).unwrap();
        }
        let (digest, _) = writer.stage(&mut staged).unwrap();
        assert!(!store.path_of(&digest).exists());
        store.publish(staged).unwrap();
        assert!(store.get_verified(&digest).unwrap() == other);
        assert!(temp_files(dir.path()).is_empty());

        // A blob that ends inside its first block.
        let mut writer = store.writer().unwrap();
        writer.write(b"short").unwrap();
        let (digest, len) = writer.finish().unwrap();
        assert_eq!(
            (len, store.get_verified(&digest).unwrap()),
            (5, b"short".to_vec())
        );
    }

    /// Direct I/O refused in the middle of a chunk (part of it may have got out): the file is
    /// cut back to the chunks written whole, and the chunk's bytes and the rest of the piece
    /// are handed back to be written buffered from there.
    #[test]
    fn a_direct_write_refused_midway_resumes_where_its_chunk_began() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let mut file = File::create(&path).unwrap();
        let Some(mut direct) = DirectBuffer::enable(&file, DIRECT_CHUNK).unwrap() else {
            eprintln!("no direct I/O on this filesystem: nothing to refuse");
            return;
        };
        let first = vec![1u8; DIRECT_CHUNK];
        assert_eq!(direct.write(&mut file, &first).unwrap(), Ok(()));
        assert_eq!(direct.write(&mut file, &[2u8; 100]).unwrap(), Ok(()));
        // What a partial write before the refusal would leave: 4 KiB of the next chunk.
        set_direct(&file, false).unwrap();
        file.write_all(&[9u8; DIRECT_ALIGN]).unwrap();
        let held = direct
            .refused(&file, io::Error::from_raw_os_error(libc::EINVAL), &[3u8; 7])
            .unwrap()
            .unwrap_err();
        assert_eq!(held, [vec![2u8; 100], vec![3u8; 7]].concat());
        file.write_all(&held).unwrap();
        drop(file);
        let on_disk = fs::read(&path).unwrap();
        assert!(on_disk == [first, held].concat(), "{} bytes", on_disk.len());
        // Any other error is the caller's, as it is.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let mut direct = DirectBuffer::enable(&file, DIRECT_CHUNK).unwrap().unwrap();
        let other = direct.refused(&file, io::Error::from_raw_os_error(libc::EIO), &[]);
        assert_eq!(other.unwrap_err().raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn a_blob_abandoned_between_pieces_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let mut writer = store.writer().unwrap();
        writer.write(b"the first half of a message").unwrap();
        drop(writer);
        assert!(temp_files(dir.path()).is_empty());
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn a_copy_is_verified_on_the_way_a_mib_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..(5 * 1024 * 1024 / 2 + 7))
            .map(|i| (i % 251) as u8)
            .collect();
        let digest = store.put(&bytes).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            store.copy_verified(&digest, &mut out).unwrap(),
            bytes.len() as u64
        );
        assert!(out == bytes);

        let mut altered = bytes.clone();
        altered[2 * 1024 * 1024 + 3] ^= 1;
        fs::write(store.path_of(&digest), &altered).unwrap();
        let err = store.copy_verified(&digest, &mut Vec::new()).unwrap_err();
        assert_eq!(err.action, "verify");
        let missing = Sha256Digest::of(b"never stored");
        assert_eq!(
            store
                .copy_verified(&missing, &mut Vec::new())
                .unwrap_err()
                .action,
            "read"
        );
    }

    #[test]
    fn storing_bytes_that_are_there_already_makes_the_blob_look_new_to_gc() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let digest = store.put(b"an orphan from long ago").unwrap();
        let path = store.path_of(&digest);
        let age = |p: &Path| {
            fs::metadata(p)
                .unwrap()
                .modified()
                .unwrap()
                .elapsed()
                .unwrap_or_default()
        };
        let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 86400);
        let set_old = || {
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(long_ago)
                .unwrap()
        };
        set_old();
        assert!(age(&path).as_secs() > 2 * 86400);
        store.put(b"an orphan from long ago").unwrap();
        assert!(age(&path).as_secs() < 60, "put refreshed it");
        set_old();
        let mut staged = store.staging().unwrap();
        store
            .stage(b"an orphan from long ago", digest, &mut staged)
            .unwrap();
        assert!(staged.is_empty(), "nothing new to write");
        assert!(age(&path).as_secs() < 60, "stage refreshed it");
        assert_eq!(store.get(&digest).unwrap(), b"an orphan from long ago");
    }

    #[test]
    fn put_is_content_addressed_durable_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let d1 = store.put(b"hello").unwrap();
        let d2 = store.put(b"hello").unwrap();
        assert_eq!(d1, d2);
        assert_eq!(
            d1.to_hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(store.get(&d1).unwrap(), b"hello");
        assert!(store.path_of(&d1).ends_with(format!("2c/{}", d1.to_hex())));
        // Nothing is left behind in tmp/.
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(Sha256Digest::from_hex(&d1.to_hex()), Some(d1));
    }

    #[test]
    fn staged_blobs_appear_only_when_published_and_unpublished_ones_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let (a, b) = (b"first blob".as_slice(), b"second blob".as_slice());
        let (da, db) = (Sha256Digest::of(a), Sha256Digest::of(b));
        let mut staged = store.staging().unwrap();
        store.stage(a, da, &mut staged).unwrap();
        let mut other = store.staging().unwrap();
        store.stage(b, db, &mut other).unwrap();
        staged.absorb(other);
        assert_eq!(staged.len(), 2);
        assert!(!store.path_of(&da).exists(), "visible before publish");
        store.publish(staged).unwrap();
        assert_eq!(store.get(&da).unwrap(), a);
        assert_eq!(store.get(&db).unwrap(), b);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // Already stored: staging it again writes nothing.
        let mut again = store.staging().unwrap();
        store.stage(a, da, &mut again).unwrap();
        assert!(again.is_empty());
        // Staged then dropped (an error before publish): no temp file stays behind.
        let c = b"never published".as_slice();
        let mut dropped = store.staging().unwrap();
        store.stage(c, Sha256Digest::of(c), &mut dropped).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        drop(dropped);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(!store.path_of(&Sha256Digest::of(c)).exists());
    }

    #[test]
    fn fan_out_directories_exist_from_open_and_come_back_if_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let fans = fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(fans, 256);
        // An operator removed two fan-out directories while the store was open: storing into
        // them still works, durably or staged.
        let (a, b) = (
            b"into a removed fan".as_slice(),
            b"staged into one".as_slice(),
        );
        let (da, db) = (Sha256Digest::of(a), Sha256Digest::of(b));
        for d in [da, db] {
            fs::remove_dir(store.path_of(&d).parent().unwrap()).unwrap();
        }
        store.put_with_digest(a, da).unwrap();
        assert_eq!(store.get(&da).unwrap(), a);
        let mut staged = store.staging().unwrap();
        store.stage(b, db, &mut staged).unwrap();
        store.publish(staged).unwrap();
        assert_eq!(store.get(&db).unwrap(), b);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // Reopening finds them all again.
        drop(RawStore::open(dir.path()).unwrap());
        let fans = fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(fans, 256);
    }

    #[test]
    fn large_blobs_are_written_around_the_page_cache_byte_exact() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        // Below the direct threshold, just above it with a ragged tail, and across two chunks.
        let sizes = [
            DIRECT_WRITE_BYTES - 1,
            DIRECT_WRITE_BYTES + 123,
            DIRECT_CHUNK + DIRECT_ALIGN + 7,
        ];
        let blobs: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (j * 31 + i * 7) as u8).collect())
            .collect();
        let mut staged = store.staging().unwrap();
        for blob in &blobs {
            store
                .stage(blob, Sha256Digest::of(blob), &mut staged)
                .unwrap();
        }
        store.publish(staged).unwrap();
        for blob in &blobs {
            let digest = Sha256Digest::of(blob);
            assert_eq!(
                fs::metadata(store.path_of(&digest)).unwrap().len(),
                blob.len() as u64
            );
            assert!(store.get(&digest).unwrap() == *blob, "bytes differ");
        }
        // On Linux the direct path is really taken here (tmp dirs are on a block filesystem).
        if cfg!(target_os = "linux") {
            let path = dir.path().join("direct-probe");
            let mut f = File::create_new(&path).unwrap();
            assert!(write_direct(&mut f, &blobs[1]).unwrap(), "O_DIRECT refused");
            drop(f);
            assert!(fs::read(&path).unwrap() == blobs[1]);
        }
    }

    #[test]
    fn direct_writes_at_once_share_a_few_bounce_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        // Eight threads stage large blobs at once, each blob spanning two chunks.
        let blobs: Vec<Vec<u8>> = (0..8u8)
            .map(|i| {
                (0..DIRECT_CHUNK + 5000)
                    .map(|j| (j as u8) ^ i.wrapping_mul(37))
                    .collect()
            })
            .collect();
        let staged: Vec<Staged> = std::thread::scope(|scope| {
            let writers: Vec<_> = blobs
                .iter()
                .map(|blob| {
                    let store = &store;
                    scope.spawn(move || {
                        let mut staged = store.staging().unwrap();
                        store
                            .stage(blob, Sha256Digest::of(blob), &mut staged)
                            .unwrap();
                        staged
                    })
                })
                .collect();
            writers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        for staged in staged {
            store.publish(staged).unwrap();
        }
        for blob in &blobs {
            assert!(store.get_verified(&Sha256Digest::of(blob)).unwrap() == *blob);
        }
        // What the threads borrowed was given back, and no more than a few are kept.
        let kept = DIRECT_BUFFERS.lock().unwrap().len();
        assert!(kept <= DIRECT_BUFFERS_KEPT, "{kept} bounce buffers kept");
    }

    /// Sets a blob's time three days back, as an orphan from long ago.
    fn make_old(store: &RawStore, digest: &Sha256Digest) {
        let f = OpenOptions::new()
            .write(true)
            .open(store.path_of(digest))
            .unwrap();
        let then = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 86_400);
        f.set_modified(then).unwrap();
    }

    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

    #[test]
    fn gc_removes_an_old_blob_and_puts_a_young_one_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let gc = store.lock_for_gc().unwrap();
        let old = store.put(b"old orphan").unwrap();
        make_old(&store, &old);
        let young = store.put(b"young orphan").unwrap();
        assert_eq!(
            store.remove_if_old(&gc, &old, DAY).unwrap(),
            Removal::Removed(10)
        );
        assert!(!store.path_of(&old).exists());
        assert_eq!(
            store.remove_if_old(&gc, &young, DAY).unwrap(),
            Removal::Young
        );
        assert_eq!(store.get_verified(&young).unwrap(), b"young orphan");
        assert_eq!(store.remove_if_old(&gc, &old, DAY).unwrap(), Removal::Gone);
        assert_eq!(tmp_files(dir.path()), Vec::<String>::new());
    }

    /// A worker reuses an old blob (the same bytes arrive again) while gc deletes it: whatever
    /// the order of their steps, the blob is there once the worker has decided.
    #[test]
    fn a_blob_reused_while_gc_removes_it_is_never_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let bytes: &[u8] = b"the same form, sent again a month later";
        let len = bytes.len() as u64;
        let digest = store.put(bytes).unwrap();
        let dest = store.path_of(&digest);

        // The worker first: gc finds the blob young and puts it back.
        make_old(&store, &digest);
        assert!(already_stored(&dest, len));
        let gc = store.lock_for_gc().unwrap();
        assert_eq!(
            store.remove_if_old(&gc, &digest, DAY).unwrap(),
            Removal::Young
        );
        assert_eq!(store.get_verified(&digest).unwrap(), bytes);

        // gc moves it aside first: the worker does not count on it and writes it again.
        make_old(&store, &digest);
        let aside = store.set_aside(&digest).unwrap().unwrap();
        assert!(!already_stored(&dest, len));
        store.put_with_digest(bytes, digest).unwrap();
        assert_eq!(aside.remove_if_old(DAY).unwrap(), Removal::Removed(len));
        assert_eq!(store.get_verified(&digest).unwrap(), bytes);

        // The worker opened it before gc moved it aside, and sets its time after gc read the
        // old one and deleted it: setting the time of an open file succeeds all the same, so
        // the worker must see that the blob is no longer in place.
        make_old(&store, &digest);
        let opened = OpenOptions::new().write(true).open(&dest).unwrap();
        let aside = store.set_aside(&digest).unwrap().unwrap();
        assert_eq!(aside.remove_if_old(DAY).unwrap(), Removal::Removed(len));
        assert!(!matches!(touch_in_place(&opened, &dest), Ok(true)));

        // The same, the time set between the move and gc's look: gc puts it back.
        store.put_with_digest(bytes, digest).unwrap();
        make_old(&store, &digest);
        let opened = OpenOptions::new().write(true).open(&dest).unwrap();
        let aside = store.set_aside(&digest).unwrap().unwrap();
        assert!(!matches!(touch_in_place(&opened, &dest), Ok(true)));
        assert_eq!(aside.remove_if_old(DAY).unwrap(), Removal::Young);
        assert_eq!(store.get_verified(&digest).unwrap(), bytes);
        assert_eq!(tmp_files(dir.path()), Vec::<String>::new());
    }

    /// The files in `tmp/` but the gc lock's.
    fn tmp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != GC_LOCK)
            .collect()
    }

    /// Where `set_aside` puts a blob, as a gc of this `pid` leaves it when killed.
    fn aside_path(dir: &Path, digest: &Sha256Digest, pid: u32) -> PathBuf {
        dir.join("tmp")
            .join(format!("{}.{pid}.{ASIDE_SUFFIX}", digest.to_hex()))
    }

    #[test]
    fn a_blob_gc_had_moved_aside_when_it_died_is_put_back_at_open_young() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let bytes: &[u8] = b"moved aside by a gc that was killed";
        let digest = store.put(bytes).unwrap();
        make_old(&store, &digest);
        // Under pid 1, which always runs (a gc in a container is often pid 1): what decides is
        // that no gc holds the lock, not the pid.
        let aside = aside_path(dir.path(), &digest, 1);
        fs::rename(store.path_of(&digest), &aside).unwrap();
        // While a gc runs, its blobs aside are its own.
        let gc = store.lock_for_gc().unwrap();
        drop(RawStore::open(dir.path()).unwrap());
        assert!(aside.exists() && !store.path_of(&digest).exists());
        assert!(store.lock_for_gc().is_err(), "one gc at a time");
        drop(gc);
        let store = RawStore::open(dir.path()).unwrap();
        assert_eq!(store.get_verified(&digest).unwrap(), bytes);
        assert!(!aside.exists());
        // It may have been a blob a worker was reusing: it comes back young.
        let age = fs::metadata(store.path_of(&digest))
            .unwrap()
            .modified()
            .unwrap()
            .elapsed()
            .unwrap_or_default();
        assert!(age < DAY, "{age:?}");
    }

    #[test]
    fn a_blob_put_back_never_replaces_the_copy_a_worker_wrote_meanwhile() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let bytes: &[u8] = b"the same bytes, set aside and written again";
        let digest = store.put(bytes).unwrap();
        let aside = aside_path(dir.path(), &digest, 0);
        fs::rename(store.path_of(&digest), &aside).unwrap();
        // A worker found the place empty and wrote the bytes again (and its record may already
        // refer to them); then the aside is put back, at open or by gc.
        store.put(bytes).unwrap();
        let written = fs::metadata(store.path_of(&digest)).unwrap().ino();
        drop(RawStore::open(dir.path()).unwrap());
        assert_eq!(fs::metadata(store.path_of(&digest)).unwrap().ino(), written);
        assert!(!aside.exists());
        // gc's own put-back of a young blob, the same.
        let gc = store.lock_for_gc().unwrap();
        let set = store.set_aside(&digest).unwrap().unwrap();
        store.put(bytes).unwrap();
        let written = fs::metadata(store.path_of(&digest)).unwrap().ino();
        assert_eq!(set.remove_if_old(DAY).unwrap(), Removal::Young);
        assert_eq!(fs::metadata(store.path_of(&digest)).unwrap().ino(), written);
        assert_eq!(store.get_verified(&digest).unwrap(), bytes);
        drop(gc);
        assert_eq!(tmp_files(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn temp_files_of_dead_processes_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = RawStore::open(dir.path()).unwrap();
        let tmp = dir.path().join("tmp");
        // pid 0 never names a user process; our own pid is alive.
        let dead = tmp.join("ab.0.1");
        let alive = tmp.join(format!("cd.{}.2", std::process::id()));
        fs::write(&dead, b"abandoned").unwrap();
        fs::write(&alive, b"in progress").unwrap();
        drop(store);
        RawStore::open(dir.path()).unwrap();
        assert!(!dead.exists());
        assert!(alive.exists());
    }
}
