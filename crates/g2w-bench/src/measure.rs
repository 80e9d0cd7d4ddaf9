//! What the bench reads beside the rates: the disk's own bound, and figures from the server's `/metrics`.

use super::*;

/// What the disk alone allows a server that acknowledges an event only once it is on disk: events arrive at
/// `rate` per second for `secs` seconds, and a group-commit writer that does nothing else takes every event that
/// has arrived, writes a 4 KiB page for each (and one for the commit) to a file in `dir`, and calls
/// `fdatasync`. Returns each event's time from arrival to the end of its `fdatasync`, in milliseconds.
pub(super) fn disk_bound(dir: &std::path::Path, rate: u64, secs: u64) -> std::io::Result<Vec<f64>> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    const SPAN: u64 = 4 << 20;
    let path = dir.join("disk-bound");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    file.set_len(SPAN)?;
    file.sync_all()?;
    let page = [0x5a_u8; PAGE];
    let n = rate * secs;
    let start = Instant::now();
    let due = |i: u64| start + Duration::from_secs_f64(i as f64 / rate as f64);
    let (mut waits, mut next, mut offset) = (Vec::with_capacity(n as usize), 0, 0);
    while next < n {
        let now = Instant::now();
        if due(next) > now {
            std::thread::sleep(due(next) - now);
            continue;
        }
        let mut last = next;
        while last < n && due(last) <= now {
            last += 1;
        }
        for _ in next..=last {
            file.write_all_at(&page, offset)?;
            offset = (offset + PAGE as u64) % SPAN;
        }
        file.sync_data()?;
        let done = Instant::now();
        waits.extend((next..last).map(|i| (done - due(i)).as_secs_f64() * 1000.0));
        next = last;
    }
    std::fs::remove_file(path)?;
    Ok(waits)
}

/// From the server's `/metrics`: the share of its store commits that took over 3 ms, and the upper bound of the
/// histogram bucket that holds the 99th percentile (in seconds).
pub(super) fn commit_tail(metrics: &str) -> Option<(f64, f64)> {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("g2w_store_commit_duration_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, n) = l.split_once("\"} ")?;
            Some((le.parse().unwrap_or(f64::INFINITY), n.trim().parse().ok()?))
        })
        .collect();
    let count = buckets.last()?.1;
    if count == 0.0 {
        return None;
    }
    let within_3ms = buckets.iter().find(|(le, _)| *le >= 0.003)?.1;
    let p99 = buckets.iter().find(|(_, n)| *n >= 0.99 * count)?.0;
    Some((1.0 - within_3ms / count, p99))
}

/// A counter's value in a `/metrics` text.
pub(super) fn counter(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
