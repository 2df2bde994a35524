//! `sealgate queue list`: the queue of a state directory as a table or JSON (like `mailq`).

use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::delivery::Status;
use crate::spool::{QueuedMessage, RcptStatus, SpoolError, scan};

/// Prints the live messages of the queue in `dir`; an absent queue is an empty one.
pub fn print(dir: &Path, as_json: bool) -> Result<(), SpoolError> {
    let messages = if dir.is_dir() { scan(dir)? } else { Vec::new() };
    let mut out = std::io::stdout().lock();
    let text = if as_json {
        let list: Vec<_> = messages.iter().map(to_json).collect();
        let mut s = serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".into());
        s.push('\n');
        s
    } else {
        table(&messages)
    };
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

/// A recipient's state word and its last status, if any.
fn status(r: &crate::spool::Recipient) -> (&'static str, Option<&Status>) {
    match &r.status {
        RcptStatus::Pending => ("pending", r.last_error.as_ref()),
        RcptStatus::Delivered(t) => ("delivered", Some(t)),
        RcptStatus::Failed(t) => ("failed", Some(t)),
    }
}

/// One message as `queue list --json` and the management API show it.
pub fn to_json(m: &QueuedMessage) -> serde_json::Value {
    json!({
        "id": m.id,
        "from": m.mail_from,
        "size": m.size,
        "arrival": m.arrival,
        "attempts": m.attempts,
        "next_attempt": m.next_attempt,
        "recipients": m.recipients.iter().map(|r| {
            let (s, detail) = status(r);
            json!({
                "address": r.address,
                "status": s,
                "detail": detail.map(Status::to_string),
                "source": detail.map(|d| d.source.name()),
            })
        }).collect::<Vec<_>>(),
    })
}

fn table(messages: &[QueuedMessage]) -> String {
    let mut s = String::new();
    for m in messages {
        let from = if m.mail_from.is_empty() {
            "<>"
        } else {
            m.mail_from.as_str()
        };
        s.push_str(&format!(
            "{}  {:>9} B  attempts {}  next {}  from {}\n",
            m.id, m.size, m.attempts, m.next_attempt, from
        ));
        for r in &m.recipients {
            let (st, detail) = status(r);
            s.push_str(&format!("    {:<9} {}", st, r.address));
            if let Some(d) = detail {
                s.push_str(&format!("  ({d})"));
            }
            s.push('\n');
        }
    }
    s.push_str(&format!("{} message(s) queued\n", messages.len()));
    s
}
