//! `ha-bench`: Castor's benchmark library. The `ha-bench` binary is its command line.
//!
//! | module | what |
//! |---|---|
//! | [`cases`] | the generated page-pair cases of `shared/bench/PAGE-CASES.md` |
//! | [`pgpairs`] | the reader of page pairs captured from real guests |
//! | [`codec`] | the codec benchmark |
//! | [`encoder`] | the encode stage's CPU per checkpoint, mode against mode, on the same epochs of a real guest (`ha-bench encoder`) |
//! | [`disksync`] | the initial sync of a disk replica that differs in a share of its blocks (`ha-bench disksync`) |
//! | [`reprotect`] | re-protection to a backup holding a stale image of the guest, against a full copy (`ha-bench reprotect`) |
//! | [`drill`] | the failover drill |
//! | [`switchover`] | a planned switchover against a failover and a cold restart, by link rate (`ha-bench switchover`) |
//! | [`cluster`] | the drill with many pairs across hosts, one host killed (`ha-bench drill --pairs N --hosts H`) |
//! | [`hosts`] | network namespaces as hosts on one bridge, with an etcd member |
//! | [`disk`] | the disk images of a bench pair, and the drill's checks of the replica |
//! | [`failover`] | the drill across guest memory sizes (`ha-bench failover`) |
//! | [`compare`] | the modes side by side on real guests (`ha-bench compare`) |
//! | [`plot`] | PNG plots of a comparison |
//! | [`pair`] | starting and watching the daemons |
//! | [`pause`] | pause per checkpoint against dirty pages (`ha-bench pause`) |
//! | [`chaos`] | the fault campaign (`ha-bench chaos`) |
//! | [`proxy`] | the fault proxy the campaign puts on the link |

pub mod cases;
pub mod chaos;
pub mod cluster;
pub mod codec;
pub mod compare;
pub mod disk;
pub mod disksync;
pub mod drill;
pub mod encoder;
pub mod failover;
pub mod hosts;
pub mod pair;
pub mod pause;
pub mod pgpairs;
pub mod plot;
pub mod proxy;
pub mod reprotect;
pub mod switchover;

/// A markdown table: `head`'s cells, then one row per item of `rows`.
pub fn markdown_table(head: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    let mut s = line(&head.iter().map(|h| (*h).to_string()).collect::<Vec<_>>());
    s.push_str(&format!("|{}\n", "---|".repeat(head.len())));
    for r in rows {
        s.push_str(&line(&r));
    }
    s
}
