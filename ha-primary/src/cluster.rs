//! The cluster view (`ha-primary cluster`): every protected guest recorded in etcd — its
//! key, who holds it, and the status its runner last published under `<key>/status`
//! (host, backup, state, last committed checkpoint, lag, bytes/s) — as a table or JSON.

use serde_json::Value;

use ha_lease::status_key;

/// One guest as etcd records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GuestRow {
    /// The guest's key.
    pub key: String,
    /// Who holds it (the key's value).
    pub holder: String,
    /// The runner's last published status (null when it published none yet).
    pub status: Value,
}

/// The guests among `entries` (every key and value under the prefix, in key order): a key
/// whose `<key>/status` sibling is a status is a guest's; a key held with no status yet is
/// listed too.
pub fn rows(entries: &[(String, Vec<u8>)]) -> Vec<GuestRow> {
    let value = |k: &str| {
        entries
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_slice())
    };
    entries
        .iter()
        .filter(|(k, _)| !k.ends_with("/status"))
        .map(|(k, v)| GuestRow {
            key: k.clone(),
            holder: String::from_utf8_lossy(v).into_owned(),
            status: value(&status_key(k))
                .and_then(|s| serde_json::from_slice(s).ok())
                .unwrap_or(Value::Null),
        })
        .collect()
}

/// The rows as a fixed-width table.
pub fn table(rows: &[GuestRow]) -> String {
    let mut out = format!(
        "{:<28} {:<14} {:<22} {:<12} {:>10} {:>8} {:>12}  {}\n",
        "GUEST", "HOST", "BACKUP", "STATE", "EPOCH", "LAG ms", "BYTES/s", "HOLDER"
    );
    for r in rows {
        let s = &r.status;
        let text = |k: &str| s[k].as_str().unwrap_or("-").to_string();
        let num = |k: &str| s[k].as_f64().map_or("-".into(), |n| format!("{n:.0}"));
        out.push_str(&format!(
            "{:<28} {:<14} {:<22} {:<12} {:>10} {:>8} {:>12}  {}\n",
            r.key,
            text("host"),
            text("backup"),
            text("state"),
            num("last_epoch"),
            num("lag_ms"),
            num("bytes_per_s"),
            r.holder
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_statuses_pair_up() {
        let status = br#"{"host":"p1","backup":"10.0.0.2:7000","state":"protected","last_epoch":42,"lag_ms":3,"bytes_per_s":1234}"#;
        let entries = vec![
            (
                "/castor/a".to_string(),
                b"ha-primary on p1 (pid 1)".to_vec(),
            ),
            ("/castor/a/status".to_string(), status.to_vec()),
            ("/castor/b".to_string(), b"ha-backup on b1 (pid 2)".to_vec()),
        ];
        let r = rows(&entries);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].status["last_epoch"], 42);
        assert_eq!(r[1].status, Value::Null);
        let t = table(&r);
        assert!(t.contains("/castor/a") && t.contains("protected") && t.contains("1234"));
        assert!(
            t.lines()
                .nth(2)
                .is_some_and(|l| l.contains("ha-backup on b1"))
        );
    }
}
