//! Threads for bulk CPU work (hashing an upload, freeing removed files) at
//! a lower CPU priority than request handling. Threads that mostly wait
//! for a disk (the filesystem driver's writers) are not bulk: a late
//! wake-up costs them the disk's time, not CPU.
//!
//! On a busy registry the cores are shared by a few dozen such threads and
//! the async workers that answer requests. At equal priority a manifest GET
//! waits for its share behind all of them (p99 over 150 ms with 16 uploads
//! on two cores); at a lower one the bulk work takes what the requests
//! leave, which on an idle machine is everything. Nice +10 rather than +5:
//! with 16 uploads each thread at +5 still weighs a third of a runtime
//! worker, and 32 of them outweighed the two workers (`bench/load.sh`:
//! manifest p99 during pushes 35-78 ms at +5, 21-27 ms at +10, push
//! throughput unchanged). Dedicated threads rather
//! than the shared blocking pool, because a thread cannot raise its
//! priority again without CAP_SYS_NICE, and a pool thread is reused for
//! small work later.

/// The nice value added to bulk threads.
const BULK_NICENESS: libc::c_int = 10;

/// Runs `work` on a new thread named `name` at the bulk priority.
pub fn spawn_bulk<F>(name: &str, work: F) -> std::io::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    spawn(name, true, work)
}

/// Runs `work` on a new thread named `name`, at the bulk priority when
/// `bulk`, else at the process's own.
pub fn spawn<F>(name: &str, bulk: bool, work: F) -> std::io::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        if bulk {
            lower_priority();
        }
        work();
    })?;
    Ok(())
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: gettid and setpriority only read their integer arguments; on
    // Linux PRIO_PROCESS with a thread id changes that thread alone.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, BULK_NICENESS) };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower a bulk thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_threads_run_at_a_lower_priority() {
        let (sender, receiver) = std::sync::mpsc::channel();
        spawn_bulk("dvcr-test-bulk", move || {
            // SAFETY: as above.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
            let _ = sender.send(nice);
        })
        .unwrap();
        // SAFETY: as above.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let bulk = receiver.recv().unwrap();
        assert_eq!(bulk, (own + BULK_NICENESS).min(19));
    }
}
