//! CPU time of the processes a drill starts (hub instances, the broker),
//! read from `/proc/<pid>/stat`, so that a drill can say what each setup
//! operation and each leaf cost the hub.

use serde::Serialize;

/// `/proc/<pid>/stat` counts in USER_HZ ticks, 100 per second on every
/// Linux architecture the drill runs on (it is fixed by the kernel ABI, not
/// by `CONFIG_HZ`).
const TICKS_PER_SECOND: f64 = 100.0;

/// User plus system CPU seconds `pid` has used, if it is running.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// utime + stime of a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces, so fields are counted after it.
fn parse_stat(stat: &str) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // Fields 3.. follow the name: utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// The processes measured, and one reading of each.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// (pid, CPU seconds) of each hub instance, in order; `None` once gone.
    pub hubs: Vec<Option<(u32, f64)>>,
    /// The same for the drill's own broker.
    pub broker: Option<(u32, f64)>,
}

impl Reading {
    /// Reads `hubs` and `broker` now.
    pub fn take(hubs: &[Option<u32>], broker: Option<u32>) -> Reading {
        let read = |pid: Option<u32>| pid.and_then(|pid| cpu_seconds(pid).map(|s| (pid, s)));
        Reading { hubs: hubs.iter().map(|&pid| read(pid)).collect(), broker: read(broker) }
    }
}

/// CPU seconds between two readings of each process; `None` for one that
/// was restarted (another pid) or gone at either reading.
fn between(from: Option<(u32, f64)>, to: Option<(u32, f64)>) -> Option<f64> {
    match (from, to) {
        (Some((a, s0)), Some((b, s1))) if a == b => Some(s1 - s0),
        _ => None,
    }
}

/// What a stretch of the drill cost the processes it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CpuSpent {
    /// CPU seconds of each hub instance (`null`: restarted or killed in between).
    pub hubs_s: Vec<Option<f64>>,
    /// Of every instance together, when each was measured.
    pub hub_total_s: Option<f64>,
    /// The drill's own broker's CPU seconds (Kafka mode with `--kafka tansu`).
    pub broker_s: Option<f64>,
    /// Hub CPU per operation of the stretch (setup operation or leaf), in µs.
    pub hub_per_op_us: Option<f64>,
}

impl CpuSpent {
    /// From `from` to `to`, over `ops` operations.
    pub fn between(from: &Reading, to: &Reading, ops: usize) -> CpuSpent {
        let hubs_s: Vec<Option<f64>> = from.hubs.iter().zip(&to.hubs).map(|(a, b)| between(*a, *b)).collect();
        let hub_total_s = if hubs_s.is_empty() { None } else { hubs_s.iter().copied().sum::<Option<f64>>() };
        let hub_per_op_us = hub_total_s.filter(|_| ops > 0).map(|s| s * 1e6 / ops as f64);
        CpuSpent { hubs_s, hub_total_s, broker_s: between(from.broker, to.broker), hub_per_op_us }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_after_a_name_with_spaces() {
        let stat = "4242 (caep hub) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat(stat), Some(3.0));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_uses_cpu() {
        let me = std::process::id();
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        assert!(cpu_seconds(me).is_some_and(|s| s > 0.0));
    }

    #[test]
    fn a_restarted_process_is_not_measured_across_its_restart() {
        let from = Reading { hubs: vec![Some((1, 1.0)), Some((2, 1.0))], broker: Some((9, 5.0)) };
        let to = Reading { hubs: vec![Some((1, 3.0)), Some((7, 0.5))], broker: Some((9, 6.0)) };
        let spent = CpuSpent::between(&from, &to, 4);
        assert_eq!(spent.hubs_s, vec![Some(2.0), None]);
        assert_eq!((spent.hub_total_s, spent.broker_s, spent.hub_per_op_us), (None, Some(1.0), None));
        let same = CpuSpent::between(&from, &Reading { hubs: vec![Some((1, 2.0)), Some((2, 2.0))], broker: None }, 4);
        assert_eq!((same.hub_total_s, same.hub_per_op_us), (Some(2.0), Some(500_000.0)));
    }
}
