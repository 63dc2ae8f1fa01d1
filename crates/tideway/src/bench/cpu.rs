//! CPU time spent during a bench phase, read from Linux's `/proc`: by this process's threads
//! (`/proc/self/task/*/stat`), by its store writer thread, and by the whole machine
//! (`/proc/stat`). Divided by the objects a phase wrote it says where a limit is however busy
//! the machine is (wall-clock throughput does not), and, against `cores / target`, whether a
//! throughput target fits in the machine's CPU at all. Off Linux the readings are `None` and
//! the benches print no CPU line.

use std::time::Duration;

use tideway_store::sqlite::WRITER_THREAD_NAME;

/// Milliseconds in one clock tick of `/proc`'s counters: `USER_HZ` is 100 on Linux.
const TICK_MS: u64 = 10;

/// `ticks` of `/proc` as a duration. A machine's counters are summed over its cores since
/// boot, so they outgrow 32 bits within days on a big machine: all arithmetic is 64-bit.
fn ticks(ticks: u64) -> Option<Duration> {
    Some(Duration::from_millis(ticks.checked_mul(TICK_MS)?))
}

/// CPU time this process's threads used: in all, and by the store's writer thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadCpu {
    pub total: Duration,
    pub writer: Duration,
}

impl ThreadCpu {
    pub fn read() -> Option<ThreadCpu> {
        let mut cpu = ThreadCpu::default();
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let Some((comm, used)) = task_cpu(&stat) else {
                continue;
            };
            cpu.total += used;
            if comm == WRITER_THREAD_NAME {
                cpu.writer += used;
            }
        }
        Some(cpu)
    }

    pub fn since(after: Option<Self>, before: Option<Self>) -> Option<ThreadCpu> {
        let (after, before) = (after?, before?);
        Some(ThreadCpu {
            total: after.total.saturating_sub(before.total),
            writer: after.writer.saturating_sub(before.writer),
        })
    }
}

/// A thread's name and CPU time (user + system) from its `stat` line: "pid (comm) state ppid
/// … utime stime …", fields 14 and 15, counted after the closing parenthesis since `comm` may
/// hold spaces and parentheses.
fn task_cpu(stat: &str) -> Option<(&str, Duration)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = stat.get(open + 1..close)?;
    let mut fields = stat.get(close + 1..)?.split_whitespace().skip(11);
    let mut next = || fields.next()?.parse::<u64>().ok();
    let (user, system) = (next()?, next()?);
    Some((comm, ticks(user.checked_add(system)?)?))
}

/// Busy CPU time of the whole machine, all cores together: every process on it, PostgreSQL
/// included when it runs here.
pub fn machine_busy() -> Option<Duration> {
    busy_time(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The busy time in `/proc/stat`'s first line ("cpu  user nice system idle iowait irq softirq
/// steal guest guest_nice", in ticks): everything but idle and iowait. Guest time is already
/// counted in user time, so it is not added again.
fn busy_time(proc_stat: &str) -> Option<Duration> {
    let line = proc_stat.lines().next()?;
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let counters: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = counters[..] else {
        return None;
    };
    let busy = [nice, system, irq, softirq, steal]
        .into_iter()
        .try_fold(user, u64::checked_add)?;
    ticks(busy)
}

/// The cores this process may run on (what the machine budget is counted in).
pub fn cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// Microseconds of CPU an object, as the benches print it.
pub fn per_object(spent: Duration, objects: u64) -> f64 {
    spent.as_secs_f64() * 1e6 / objects.max(1) as f64
}

/// The CPU an object may take for `target` objects/s to fit in `cores` fully busy cores, in
/// microseconds.
pub fn budget_per_object(cores: u32, target: u64) -> f64 {
    f64::from(cores) * 1e6 / target.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_stat_line_gives_its_name_and_user_plus_system_time() {
        // Fields after "(comm)": state ppid pgrp session tty_nr tpgid flags minflt cminflt
        // majflt cmajflt utime stime …
        let stat = "4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194368 10 0 0 0 250 75 0 0 20 0";
        assert_eq!(
            task_cpu(stat),
            Some(("tokio (rt) worker", Duration::from_millis(3250)))
        );
        assert_eq!(task_cpu("4242 (cut short) S 1 2"), None);
    }

    #[test]
    fn machine_busy_time_leaves_idle_and_iowait_out() {
        let stat = "cpu  100 5 40 9000 300 2 3 7 50 0\ncpu0 50 2 20 4500 150 1 1 3 25 0\n";
        // user + nice + system + irq + softirq + steal = 100 + 5 + 40 + 2 + 3 + 7 ticks.
        assert_eq!(busy_time(stat), Some(Duration::from_millis(1570)));
        assert_eq!(busy_time("intr 1 2 3\n"), None);
        assert_eq!(busy_time("cpu  1 2 3\n"), None);
        // A month of 64 busy cores: past what 32 bits of ticks hold.
        let month = 64 * 30 * 24 * 3600 * 100_u64;
        assert_eq!(
            busy_time(&format!("cpu  {month} 0 0 0 0 0 0 0 0 0\n")),
            Some(Duration::from_secs(64 * 30 * 24 * 3600))
        );
    }

    #[test]
    fn the_budget_is_the_cores_divided_among_the_target_objects() {
        assert_eq!(budget_per_object(2, 50_000), 40.0);
        assert_eq!(per_object(Duration::from_millis(72), 1_000), 72.0);
    }
}
