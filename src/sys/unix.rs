#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

/// A signal the farm sends to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// The polite stop.
    Terminate,
    /// The end.
    Kill,
}

/// Sends `signal` to the process group led by `pid` (each worker leads its own), so a
/// worker's own children go with it; falls back to the process alone.
pub(crate) fn signal_group(pid: u32, signal: Signal) {
    let sig = match signal {
        Signal::Terminate => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and has no memory effects.
    unsafe {
        if libc::kill(-pid, sig) != 0 {
            libc::kill(pid, sig);
        }
    }
}

/// SIGKILLs whatever is left in the process group a reaped worker led (children it
/// started). Never signals the pid alone: it may already belong to another process.
pub(crate) fn kill_group_remnants(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        if pid > 1 {
            // SAFETY: kill(2) takes plain integers and has no memory effects.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// Resident set size of a process, from `/proc/<pid>/statm` (Linux); `None` elsewhere or
/// if the process is gone.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    // Resident memory but shared memory (`RssShmem`): the rings a worker shares with the
    // farm are the farm's, not the worker's growth.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let kib = field("VmRSS:")?.saturating_sub(field("RssShmem:").unwrap_or(0));
    Some(kib * 1024)
}

/// Moves the worker's stdout out of reach of user code: returns a private, close-on-exec
/// duplicate of fd 1 for frames, and points fd 1 at stderr, so a stray `println!` (or a
/// child process writing to its inherited stdout) lands in the log, not in the frame stream.
pub(crate) fn take_stdout_for_frames() -> io::Result<OwnedFd> {
    // SAFETY: fcntl and dup2 on the process's standard descriptors; the returned fd is new
    // and owned by nobody else.
    unsafe {
        let fd = libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::dup2(2, 1) < 0 {
            let err = io::Error::last_os_error();
            libc::close(fd);
            return Err(err);
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Takes fd 0 for frames from the farm, and points fd 0 at `/dev/null`, so a handler (or a
/// child process it starts) that reads stdin cannot steal protocol bytes.
pub(crate) fn take_stdin() -> io::Result<OwnedFd> {
    // SAFETY: fcntl, open and dup2 on the standard descriptors; the returned fd is new and
    // owned by nobody else; the path is a NUL-terminated literal.
    unsafe {
        let fd = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

// ===== the worker's tie to its farm =====

/// The parent this worker had when it started serving (a wrapper's pid, if the farm
/// started one); a different `getppid()` later means that parent died.
static START_PARENT: AtomicI32 = AtomicI32::new(0);
/// The farm's pid, from the worker's environment (0: unknown).
static FARM_PID: AtomicI32 = AtomicI32::new(0);
/// When the farm's process started (clock ticks since boot, 0: unknown), so a pid reused by
/// another process after the farm died is not taken for the farm.
static FARM_START: AtomicU64 = AtomicU64::new(0);
/// Whether this worker's process group is the one the farm made for it (so killing the
/// group takes the worker's children and nothing of the farm's).
static GROUP_IS_OURS: AtomicBool = AtomicBool::new(false);

/// Ties this worker's life to its farm's, and its children's lives to its own.
///
/// Linux sends the parent-death signal when the thread that spawned us exits; the farm
/// spawns from one thread that lives as long as it does. The signal is `SIGHUP` ("the
/// controlling process died"), which the farm never sends otherwise: its handler SIGKILLs
/// the whole process group (the worker and any process a handler started), where the
/// signal's default action would end the worker alone. At that moment the dying parent's
/// other threads may still stand in for it, so the handler cannot check the parent pid,
/// and need not. Then checks the farm is still alive, closing the race where it died before
/// the request was made.
pub(crate) fn follow_farm(farm: Option<u32>) {
    let farm = farm
        .and_then(|p| libc::pid_t::try_from(p).ok())
        .filter(|&p| p > 1);
    // SAFETY: getppid, getpgrp and getpgid take integers and have no memory effects; the
    // sigaction struct is zeroed (a valid value) and fully set before use; the handler only
    // makes async-signal-safe calls.
    unsafe {
        START_PARENT.store(libc::getppid(), Ordering::Relaxed);
        let Some(farm) = farm else {
            return;
        };
        FARM_PID.store(farm, Ordering::Relaxed);
        FARM_START.store(process_start_time(farm).unwrap_or(0), Ordering::Relaxed);
        let own = libc::getpgrp();
        let farms = libc::getpgid(farm);
        GROUP_IS_OURS.store(farms >= 0 && own != farms && own > 1, Ordering::Relaxed);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_farm_death as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGHUP, &action, std::ptr::null_mut());
        #[cfg(target_os = "linux")]
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP, 0, 0, 0);
    }
    if farm_is_gone() {
        eprintln!("workfarm worker: the farm is gone; exiting");
        kill_own_group();
    }
}

extern "C" fn on_farm_death(_: libc::c_int) {
    kill_own_group();
}

/// Whether the farm that started this worker is gone.
///
/// Started by the farm directly, the worker is re-parented when the farm dies, so an
/// unchanged parent settles it. Through a wrapper (`sh -c`, `timeout`), the farm is gone
/// when its pid no longer names the process that was there at start, or names a zombie.
/// With the parent outside our pid namespace there is no telling: not gone.
fn farm_is_gone() -> bool {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let start_parent = START_PARENT.load(Ordering::Relaxed);
    if parent != start_parent {
        return true;
    }
    let farm = FARM_PID.load(Ordering::Relaxed);
    if farm <= 1 || start_parent <= 0 || start_parent == farm {
        return false;
    }
    match (process_state(farm), process_start_time(farm)) {
        (Some('Z'), _) => true,
        (Some(_), Some(started)) => {
            let known = FARM_START.load(Ordering::Relaxed);
            known != 0 && started != known
        }
        // SAFETY: kill with signal 0 only checks existence. EPERM: it exists.
        _ => unsafe { libc::kill(farm, 0) != 0 && *libc::__errno_location() == libc::ESRCH },
    }
}

/// When a process started, in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn process_start_time(pid: libc::pid_t) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// SIGKILLs this worker's process group if the farm made it ours (the worker, a wrapper
/// the farm started it through, and everything a handler started), else this process.
/// Async-signal-safe.
pub(crate) fn kill_own_group() {
    // SAFETY: kill(2) takes plain integers and has no memory effects.
    unsafe {
        if GROUP_IS_OURS.load(Ordering::Relaxed) {
            libc::kill(0, libc::SIGKILL);
        }
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// A process's state letter from `/proc/<pid>/stat` (`'Z'` for a zombie).
pub(crate) fn process_state(pid: libc::pid_t) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

// ===== the farm's side of a worker's pipes =====

/// A new pipe, both ends close-on-exec: `(read, write)`.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array; each is then owned once.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// What names the file behind a descriptor (`device:inode`): the farm hands a worker this
/// for its stdin, so the worker can tell it was started by the farm while its children,
/// which inherit the environment but not that stdin, cannot be fooled.
pub(crate) fn file_identity(fd: RawFd) -> Option<String> {
    // SAFETY: fstat fills a zeroed struct it is given a pointer to.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut stat) != 0 {
            return None;
        }
        Some(format!("{}:{}", stat.st_dev, stat.st_ino))
    }
}

/// A pipe's buffer size (Linux `F_GETPIPE_SZ`).
pub(crate) fn pipe_size(fd: RawFd) -> Option<usize> {
    #[cfg(target_os = "linux")]
    // SAFETY: fcntl with integer arguments on a descriptor the caller owns.
    unsafe {
        usize::try_from(libc::fcntl(fd, libc::F_GETPIPE_SZ)).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        None
    }
}

/// Asks for a pipe buffer of `bytes` (Linux `F_SETPIPE_SZ`); the size it got, if it changed.
pub(crate) fn set_pipe_size(fd: RawFd, bytes: usize) -> Option<usize> {
    #[cfg(target_os = "linux")]
    // SAFETY: fcntl with integer arguments on a descriptor the caller owns.
    unsafe {
        let bytes = libc::c_int::try_from(bytes).ok()?;
        usize::try_from(libc::fcntl(fd, libc::F_SETPIPE_SZ, bytes)).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, bytes);
        None
    }
}

/// The per-user soft limit on pipe buffer pages (`/proc/sys/fs/pipe-user-pages-soft`), in
/// bytes; `None` if there is none or it cannot be read.
pub(crate) fn pipe_user_soft_limit() -> Option<usize> {
    let pages: usize = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    (pages > 0).then(|| pages * page)
}

/// Ignores `SIGPIPE` if it is at its default (which kills the process on a write to a
/// worker that closed its stdin). Rust programs ignore it already; a host that installed a
/// handler of its own, or chose to ignore it, is left alone.
pub(crate) fn ignore_sigpipe_if_default() {
    // SAFETY: sigaction reads into and from zeroed structs; SIG_IGN has no handler code.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut current) != 0 {
            return;
        }
        if current.sa_sigaction == libc::SIG_DFL {
            let mut ignore: libc::sigaction = std::mem::zeroed();
            ignore.sa_sigaction = libc::SIG_IGN;
            libc::sigemptyset(&mut ignore.sa_mask);
            libc::sigaction(libc::SIGPIPE, &ignore, std::ptr::null_mut());
        }
    }
}

/// Reads from a blocking descriptor into the spare capacity of `buf` (no zero-filling, which
/// would cost a memset per read on the worker's hot path). Returns 0 at end of file.
pub(crate) fn read_into(fd: &OwnedFd, buf: &mut bytes::BytesMut) -> io::Result<usize> {
    use bytes::BufMut;
    use std::os::fd::AsRawFd;
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(64 * 1024);
    }
    let spare = buf.chunk_mut();
    loop {
        // SAFETY: read(2) writes at most `spare.len()` bytes into memory `buf` owns and has
        // reserved; `advance_mut` below covers exactly the bytes it reported.
        let n = unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        if n >= 0 {
            let n = n as usize;
            // SAFETY: the kernel initialised `n` bytes of the spare capacity.
            unsafe { buf.advance_mut(n) };
            return Ok(n);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Clears `O_NONBLOCK` on a descriptor, so plain blocking reads and writes work on it.
pub(crate) fn set_blocking(fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl with integer arguments on a descriptor the caller owns.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

// ===== shared memory for large frames =====

/// A shared memory file mapped into this process, whole: the farm creates one per worker
/// and direction, the worker maps the same file, and large frames travel through it (see
/// `crate::shm`). Every access is bounds-checked here, so the safe API cannot reach outside
/// the mapping whatever offsets a peer sends.
#[derive(Debug)]
pub(crate) struct SharedMap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory, valid until `drop`; writers and readers of the
// same bytes are kept apart by the ring's protocol (a region is written only while free),
// and the flags they share are atomics.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// A new anonymous shared memory file of `len` bytes, close-on-exec and mapped. Uses no
    /// memory until pages are touched. Linux only (`memfd_create`).
    #[cfg(target_os = "linux")]
    pub(crate) fn create(name: &std::ffi::CStr, len: usize) -> io::Result<Self> {
        // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just created, owned once.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let size = libc::off_t::try_from(len).map_err(|_| io::Error::other("too large"))?;
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&fd), size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Sealed at its size: nobody holding the descriptor (a worker, or anything it
        // started) can shrink it under a mapping, which would fault (SIGBUS) on access.
        // SAFETY: fcntl with integer arguments on a descriptor we own.
        if unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::F_ADD_SEALS,
                SEALS,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, len)
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn create(_name: &std::ffi::CStr, _len: usize) -> io::Result<Self> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Maps the shared memory file `fd` as the farm passed it, its whole length (see
    /// [`inherited_shared_fd`] for how the worker gets it).
    pub(crate) fn open(fd: OwnedFd) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        // SAFETY: fstat fills a zeroed struct it is given a pointer to.
        let size = unsafe {
            let mut stat: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut stat) != 0 {
                return Err(io::Error::last_os_error());
            }
            stat.st_size
        };
        let len = usize::try_from(size).map_err(|_| io::Error::other("bad size"))?;
        // SAFETY: fcntl with integer arguments on a descriptor we own: a handler's children
        // must not inherit it.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Err(io::Error::other("empty shared memory file"));
        }
        // SAFETY: a fresh shared mapping of a file we hold open; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(SharedMap { ptr, len, fd })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// Copies `bytes` in at `offset`; `false` (and nothing written) if it does not fit.
    pub(crate) fn write(&self, offset: usize, bytes: &[u8]) -> bool {
        if offset
            .checked_add(bytes.len())
            .map_or(true, |end| end > self.len)
        {
            return false;
        }
        // SAFETY: in bounds (checked above); the ring writes only regions no reader holds.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(offset),
                bytes.len(),
            );
        }
        true
    }

    /// The `len` bytes at `offset`, if they lie inside the mapping.
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> Option<&[u8]> {
        if offset.checked_add(len).map_or(true, |end| end > self.len) {
            return None;
        }
        // SAFETY: in bounds; valid for the mapping's life, which the borrow cannot outlast.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) })
    }

    /// The 4-byte flag word at `offset` (a multiple of 4), if inside the mapping.
    pub(crate) fn flag(&self, offset: usize) -> Option<&std::sync::atomic::AtomicU32> {
        if offset % 4 != 0 || offset.checked_add(4).map_or(true, |end| end > self.len) {
            return None;
        }
        // SAFETY: in bounds and aligned (the mapping is page-aligned); an AtomicU32 has the
        // layout of a u32, and every access to flag words goes through atomics.
        Some(unsafe {
            &*self
                .ptr
                .as_ptr()
                .add(offset)
                .cast::<std::sync::atomic::AtomicU32>()
        })
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Lets the child started by `cmd` inherit descriptors `fds` (close-on-exec here, so no
/// other child, started by any thread, gets them).
pub(crate) fn inherit_in_child(cmd: &mut tokio::process::Command, fds: Vec<RawFd>) {
    // SAFETY: the closure runs in the child between fork and exec and calls only fcntl,
    // which is async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Seals on the farm's shared memory files: fixed size, seals fixed.
#[cfg(target_os = "linux")]
const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Takes ownership of descriptor `fd`, inherited from the farm, if it is one of the farm's
/// shared memory files (a memfd with exactly its seals); anything else is left alone, never
/// closed, since it belongs to someone else.
#[cfg(target_os = "linux")]
pub(crate) fn inherited_shared_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_GET_SEALS) only queries (and fails on anything but a memfd); the
    // descriptor is then owned once (the worker takes each inherited descriptor once).
    unsafe {
        if fd < 3 || libc::fcntl(fd, libc::F_GET_SEALS) != SEALS {
            return None;
        }
        Some(OwnedFd::from_raw_fd(fd))
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn inherited_shared_fd(_fd: RawFd) -> Option<OwnedFd> {
    None
}
