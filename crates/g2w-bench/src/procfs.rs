//! Readings of this machine from `/proc`: CPU time of a process, of PostgreSQL and of the whole machine, disk
//! writes of a process, and what the machine is.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

/// CPU time (user + system, all threads, finished ones included) a process has used, in seconds.
pub(super) fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces): utime and stime are the
    // 12th and 13th, in clock ticks of 1/100 s (USER_HZ on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Bytes a process has caused to be written to storage so far (its WAL and database file writes).
pub(super) fn disk_write_bytes(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// CPU time used so far by PostgreSQL's processes on this machine (the backends serving the server's pool
/// live as long as their connections, so a scenario's share is the difference).
pub(super) fn postgres_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(|e| cpu_secs(&e.file_name().to_string_lossy()))
        .sum()
}

/// Clock ticks the whole machine has spent busy (user, nice, system, irq, softirq, steal) and in all, from the
/// first line of `/proc/stat`.
pub(super) fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = ticks.iter().sum();
    // idle and iowait: fields 4 and 5 (guest time is counted inside user already).
    let waiting = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    (total - waiting, total)
}

/// The share of the machine's clock ticks spent busy since `from` (a `machine_ticks` reading), in percent; none
/// when no tick has passed.
pub(super) fn busy_since(from: (f64, f64)) -> Option<f64> {
    let (busy, total) = machine_ticks();
    (total > from.1).then(|| (busy - from.0) / (total - from.1) * 100.0)
}

pub(super) fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    // The checkout the binary was built in (it sits in its target directory), else the current directory's.
    let built_in = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let commit = [built_in, None]
        .into_iter()
        .find_map(|dir| {
            let mut git = Command::new("git");
            if let Some(dir) = dir {
                git.arg("-C").arg(dir);
            }
            let out = git.args(["rev-parse", "--short", "HEAD"]).output().ok()?;
            let commit = String::from_utf8(out.stdout).ok()?.trim().to_string();
            (out.status.success() && !commit.is_empty()).then_some(commit)
        })
        .unwrap_or_default();
    json!({"cores": cores, "cpu": model, "commit": commit})
}
