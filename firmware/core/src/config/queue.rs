//! `[queue]`: how long and how often delivery is tried, spool reserve, outbound connections.

use std::time::Duration;

use super::raw::RawQueue;
use super::values::{Range, TIMEOUT, days, duration_in, ip_addr};
use super::{ConfigError, QueueConfig, invalid};

/// The default `retry_schedule` (`1m`, `5m`, `15m`, `30m`, `1h`, `2h`, `4h`), in seconds.
const DEFAULT_RETRY_SECS: [u64; 7] = [60, 300, 900, 1800, 3600, 7200, 14_400];

pub(super) fn check(q: &RawQueue) -> Result<QueueConfig, ConfigError> {
    let retry_schedule = match &q.retry_schedule {
        None => DEFAULT_RETRY_SECS.map(Duration::from_secs).to_vec(),
        Some(list) => list
            .iter()
            .map(|s| {
                let step = Range {
                    min: Duration::from_secs(1),
                    max: days(30),
                };
                duration_in(
                    "queue.retry_schedule",
                    Some(s.as_str()),
                    Duration::ZERO,
                    step,
                )
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    if retry_schedule.is_empty() {
        return Err(invalid("queue.retry_schedule", "needs at least one delay"));
    }
    Ok(QueueConfig {
        max_queue_time: duration_in(
            "queue.max_queue_time",
            q.max_queue_time.as_deref(),
            days(5),
            Range {
                min: Duration::ZERO,
                max: days(3650),
            },
        )?,
        retry_schedule,
        min_free_bytes: q.min_free_bytes.unwrap_or(64 * 1024 * 1024),
        max_deliveries: match q.max_deliveries.unwrap_or(64) {
            n @ 1..=4096 => n,
            _ => return Err(invalid("queue.max_deliveries", "must be 1 to 4096")),
        },
        max_connections_per_hop: match q.max_connections_per_hop.unwrap_or(20) {
            n @ 1..=1000 => n,
            _ => {
                return Err(invalid(
                    "queue.max_connections_per_hop",
                    "must be 1 to 1000",
                ));
            }
        },
        connect_timeout: duration_in(
            "queue.connect_timeout",
            q.connect_timeout.as_deref(),
            Duration::from_secs(30),
            TIMEOUT,
        )?,
        bind_address: q
            .bind_address
            .as_deref()
            .map(|a| ip_addr("queue.bind_address", a))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_duration;

    #[test]
    fn default_schedule_is_the_documented_one() {
        let documented = ["1m", "5m", "15m", "30m", "1h", "2h", "4h"];
        let parsed: Vec<_> = documented
            .iter()
            .filter_map(|s| parse_duration(s))
            .collect();
        assert_eq!(parsed, DEFAULT_RETRY_SECS.map(Duration::from_secs).to_vec());
        let q = check(&RawQueue::default()).unwrap();
        assert_eq!(q.retry_schedule, parsed);
    }
}
