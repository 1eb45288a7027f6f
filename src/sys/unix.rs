#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

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
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Asks for a bigger pipe buffer (Linux `F_SETPIPE_SZ`), so a large frame crosses in a
/// few system calls instead of one per 64 KiB. Best effort: the default size still works.
pub(crate) fn grow_pipe(fd: std::os::fd::RawFd, bytes: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: fcntl on a descriptor the caller owns, with an integer argument.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, bytes as libc::c_int);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (fd, bytes);
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

/// Asks the kernel to SIGKILL this process when the thread that spawned it dies (Linux),
/// then checks the parent is still the one that spawned us, closing the race where it died
/// before the request was made.
pub(crate) fn die_with_parent(expected_parent: Option<u32>) {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    if let Some(expected) = expected_parent {
        // SAFETY: getppid has no preconditions; kill with signal 0 only checks existence.
        let (parent, expected_alive) = unsafe {
            let alive = libc::pid_t::try_from(expected).is_ok_and(|p| libc::kill(p, 0) == 0);
            (libc::getppid(), alive)
        };
        // A wrapper (`sh -c`, `timeout`) between farm and worker is fine; a farm that is
        // already gone is not.
        if u32::try_from(parent).ok() != Some(expected) && !expected_alive {
            eprintln!("workfarm worker: the farm (pid {expected}) is gone; exiting");
            std::process::exit(1);
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
