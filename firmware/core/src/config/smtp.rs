//! `[smtp]`: listeners, local domains, trusted networks, limits and timeouts.

use std::time::Duration;

use super::raw::RawSmtp;
use super::values::{TIMEOUT, cidrs, domain_names, duration_in, socket_addrs};
use super::{ConfigError, SmtpConfig, invalid};

pub(super) fn check(s: &RawSmtp) -> Result<SmtpConfig, ConfigError> {
    let listen = socket_addrs("smtp.listen", s.listen.as_deref().unwrap_or(&[]))?;
    let implicit_tls = socket_addrs(
        "smtp.implicit_tls",
        s.implicit_tls.as_deref().unwrap_or(&[]),
    )?;
    let submission = socket_addrs("smtp.submission", s.submission.as_deref().unwrap_or(&[]))?;
    if listen.is_empty() && implicit_tls.is_empty() && submission.is_empty() {
        return Err(invalid(
            "smtp.listen",
            "no listener: give smtp.listen, smtp.implicit_tls or smtp.submission",
        ));
    }
    let local_domains = domain_names(
        "smtp.local_domains",
        s.local_domains.as_deref().unwrap_or(&[]),
    )?;
    let trusted_networks = cidrs(
        "smtp.trusted_networks",
        s.trusted_networks.as_deref().unwrap_or(&[]),
    )?;
    let (max_message_bytes, max_recipients) = message_limits(s)?;
    let (max_connections, max_connections_per_ip) = connection_limits(s)?;
    Ok(SmtpConfig {
        listen,
        implicit_tls,
        submission,
        local_domains,
        trusted_networks,
        max_message_bytes,
        max_recipients,
        max_connections,
        max_connections_per_ip,
        max_errors: match s.max_errors.unwrap_or(10) {
            n @ 1..=1000 => n,
            _ => return Err(invalid("smtp.max_errors", "must be 1 to 1000")),
        },
        command_timeout: duration_in(
            "smtp.command_timeout",
            s.command_timeout.as_deref(),
            Duration::from_secs(300),
            TIMEOUT,
        )?,
        data_timeout: duration_in(
            "smtp.data_timeout",
            s.data_timeout.as_deref(),
            Duration::from_secs(180),
            TIMEOUT,
        )?,
    })
}

/// `max_message_bytes` (1024 … 2^32) and `max_recipients` (1 … 100000).
fn message_limits(s: &RawSmtp) -> Result<(u64, usize), ConfigError> {
    let max_message_bytes = s.max_message_bytes.unwrap_or(52_428_800);
    if !(1024..=1 << 32).contains(&max_message_bytes) {
        return Err(invalid(
            "smtp.max_message_bytes",
            "must be between 1024 and 4294967296",
        ));
    }
    let max_recipients = s.max_recipients.unwrap_or(100);
    if !(1..=100_000).contains(&max_recipients) {
        return Err(invalid(
            "smtp.max_recipients",
            "must be between 1 and 100000",
        ));
    }
    Ok((max_message_bytes, max_recipients))
}

/// `max_connections` (1 … 1000000) and `max_connections_per_ip` (at least 1).
fn connection_limits(s: &RawSmtp) -> Result<(usize, usize), ConfigError> {
    let max_connections = s.max_connections.unwrap_or(1000);
    let max_connections_per_ip = s.max_connections_per_ip.unwrap_or(50);
    if !(1..=1_000_000).contains(&max_connections) || max_connections_per_ip == 0 {
        return Err(invalid(
            "smtp.max_connections",
            "must be between 1 and 1000000 (and max_connections_per_ip at least 1)",
        ));
    }
    Ok((max_connections, max_connections_per_ip))
}
