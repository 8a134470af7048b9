//! What the harness reads from the kernel: CPU time, resident memory, the machine, limits.

use anyhow::{bail, Context};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

/// CPU time (user + system, nanoseconds) of one thread, from `<task>/schedstat`.
///
/// `schedstat`'s first field is the time the thread spent on a CPU, in nanoseconds: far
/// finer than the 10 ms clock ticks of `stat`, which matters for runs of a second or less.
fn task_cpu_ns(task_dir: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(task_dir.join("schedstat"))
        .with_context(|| format!("reading {}/schedstat", task_dir.display()))?;
    let first = text.split_whitespace().next().unwrap_or("");
    first
        .parse()
        .with_context(|| format!("bad schedstat in {}: {text:?}", task_dir.display()))
}

/// CPU time of every live thread of process `pid`.
///
/// Threads that already exited are not counted; qiod's threads are the tokio workers,
/// which live as long as the process (it does no blocking-pool work on these paths).
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0u64;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let entry = entry?;
        // A thread may exit between the listing and the read: skip it.
        if let Ok(ns) = task_cpu_ns(&entry.path()) {
            total += ns;
        }
    }
    Ok(Duration::from_nanos(total))
}

/// CPU time of some threads of this process (the in-process daemon's runtime threads).
pub fn threads_cpu(tids: &[i32]) -> Duration {
    let ns: u64 = tids
        .iter()
        .filter_map(|tid| task_cpu_ns(Path::new(&format!("/proc/self/task/{tid}"))).ok())
        .sum();
    Duration::from_nanos(ns)
}

/// CPU time of this whole process (all threads, living or not), from `getrusage`.
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass; zeroed is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage; RUSAGE_SELF is always a valid target.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The calling thread's kernel id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Resident set size and its peak, in bytes, from `/proc/<pid>/status`.
pub fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in {path}"))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad line in {path}: {line:?}"))?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Raises this process's open-file soft limit to the hard limit; returns the new limit.
pub fn raise_nofile() -> anyhow::Result<u64> {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                bail!("setrlimit: {}", std::io::Error::last_os_error());
            }
        }
        Ok(lim.rlim_cur)
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory preconditions; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs available to this process.
    pub nproc: usize,
    /// MemTotal from /proc/meminfo, bytes.
    pub mem_total: u64,
    /// Kernel release.
    pub kernel: String,
    /// Open-file limit after raising it.
    pub nofile: u64,
    /// /proc/loadavg when the run started (other work on the machine skews the figures).
    pub loadavg: String,
}

impl Machine {
    /// Reads it all; unknown parts stay empty rather than failing the run.
    pub fn read(nofile: u64) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| {
                l["MemTotal:".len()..]
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Machine {
            cpu,
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_total,
            kernel,
            nofile,
            loadavg: loadavg(),
        }
    }
}

/// The first three fields of /proc/loadavg.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
