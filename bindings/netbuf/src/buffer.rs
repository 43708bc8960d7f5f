//! The network buffer: a guest's packets toward the world held in the kernel until their
//! checkpoint is committed, the way Xen's Remus holds them.
//!
//! ```text
//!  guest ──► vif (dom0) ── ingress qdisc ── u32 match-all ── mirred egress redirect ──┐
//!                                                                                      │
//!      bridge ◄── the vif's ingress path, resumed by the IFB ◄── plug qdisc ◄── IFB ◄──┘
//! ```
//!
//! Traffic from the guest arrives on its vif in dom0 as *ingress*; a filter on the vif's
//! ingress qdisc redirects every frame to an IFB device, whose root qdisc is `plug`
//! (`sch_plug`). The plug lets a frame through only once it has been released:
//! [`NetBuffer::buffer`] (`TCQ_PLUG_BUFFER`) puts a mark after the frames queued so far,
//! [`NetBuffer::release_one`] (`TCQ_PLUG_RELEASE_ONE`) lets out the frames before the
//! oldest mark, [`NetBuffer::release_indefinite`] (`TCQ_PLUG_RELEASE_INDEFINITE`) lets
//! everything out and stops holding. A frame the IFB lets out continues on the vif's ingress
//! path (to the bridge) as if it had just arrived. Frames toward the guest are not held.
//!
//! The kernel's plug remembers the size of one finished epoch only: a second
//! `TCQ_PLUG_BUFFER` before the first mark was released would forget the first epoch's
//! size and later release the wrong frames. [`NetBuffer::buffer`] therefore refuses a mark
//! while one is waiting ([`NetbufError::MarkPending`]); the caller folds that epoch into
//! the next mark (its frames then leave with a later ack, never an earlier one).
//!
//! Everything is set up and torn down over rtnetlink ([`crate::nl`]), in the network
//! namespace of the thread that calls [`NetBuffer::setup`]. A plug that was set up and
//! never torn down (the process was killed) stays closed: the guest's output stays held.

use crate::nl::{NlError, Rtnl};
use netlink_packet_core::{DefaultNla, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};

/// `TCA_OPTIONS`: a plug qdisc's options are a bare `struct tc_plug_qopt`, not nested.
const TCA_OPTIONS: u16 = 2;
/// `TCQ_PLUG_*` actions (linux/pkt_sched.h).
const TCQ_PLUG_BUFFER: i32 = 0;
const TCQ_PLUG_RELEASE_ONE: i32 = 1;
const TCQ_PLUG_RELEASE_INDEFINITE: i32 = 2;
/// `ETH_P_ALL`, as the filter's protocol (network byte order in `tcm_info`).
const ETH_P_ALL: u16 = 0x0003;
/// The filter's priority on the vif's ingress qdisc.
const FILTER_PRIO: u32 = 1;
/// The plug qdisc's handle on the IFB (`1:`).
const PLUG_HANDLE: TcHandle = TcHandle { major: 1, minor: 0 };
/// The ingress qdisc's handle (`ffff:`).
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// Longest interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;
/// Default bytes the plug may hold before it drops (the kernel's own default is the
/// IFB's queue length times its MTU, about 48 KB: a busy epoch's worth would be dropped).
pub const DEFAULT_LIMIT: u32 = 16 << 20;

/// `ENOENT`, `EOPNOTSUPP`, `EEXIST`, `ENODEV`: the errnos that mean something here.
const ENOENT: i32 = libc::ENOENT;
const EOPNOTSUPP: i32 = libc::EOPNOTSUPP;
const EEXIST: i32 = libc::EEXIST;
const ENODEV: i32 = libc::ENODEV;

/// Errors setting up, driving or tearing down a network buffer.
#[derive(Debug, thiserror::Error)]
pub enum NetbufError {
    /// The interface to buffer does not exist.
    #[error(
        "interface {0} does not exist (give the guest's vif as this host names it, e.g. \
         vif5.0, or a fixed vifname= from the domain's config)"
    )]
    VifMissing(String),
    /// The IFB's name is taken.
    #[error(
        "an interface named {0} already exists: another buffer, or one left by a Castor that \
         was killed (remove it with `ip link del {0}` once no guest depends on it)"
    )]
    IfbInUse(String),
    /// An interface name longer than the kernel allows.
    #[error("interface name {0:?} is empty or longer than {IFNAME_MAX} bytes")]
    BadName(String),
    /// The kernel lacks what the buffer needs.
    #[error("the kernel has no {what}: load the {module} module (modprobe {module})")]
    ModuleMissing {
        /// What is missing, in words.
        what: &'static str,
        /// The module that provides it.
        module: &'static str,
        /// What the kernel said.
        #[source]
        source: NlError,
    },
    /// The vif already has an ingress qdisc (someone else's filters would be replaced).
    #[error(
        "{0} already has an ingress qdisc (another tool's, or a buffer left by a Castor that \
         was killed: `tc qdisc del dev {0} ingress`)"
    )]
    VifHasIngress(String),
    /// A netlink operation failed.
    #[error("{op} on {iface}")]
    Netlink {
        /// The operation.
        op: &'static str,
        /// The interface.
        iface: String,
        /// Why.
        #[source]
        source: NlError,
    },
    /// A mark is already waiting for its release.
    #[error(
        "a buffer mark on {0} is still waiting for its release: the plug keeps one epoch's \
         size only"
    )]
    MarkPending(String),
    /// A release without a mark to release.
    #[error("no buffer mark on {0} to release")]
    NoMark(String),
    /// The buffer was torn down.
    #[error("the buffer on {0} was torn down")]
    TornDown(String),
}

/// What to buffer and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The interface whose ingress (the guest's output, seen from dom0) is held.
    pub vif: String,
    /// The IFB device to create (None: [`ifb_name`] of the vif).
    pub ifb: Option<String>,
    /// Bytes the plug holds at most; frames beyond are dropped (TCP resends them).
    pub limit: u32,
}

impl Config {
    /// Buffer `vif` with the default IFB name and limit.
    pub fn new(vif: &str) -> Self {
        Self {
            vif: vif.to_string(),
            ifb: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// The IFB name for `vif`: `ifb-` and the vif's name when that fits in
/// [`IFNAME_MAX`] bytes, otherwise `ifb-` and 8 hex digits of the name's FNV-1a hash.
pub fn ifb_name(vif: &str) -> String {
    let plain = format!("ifb-{vif}");
    if plain.len() <= IFNAME_MAX {
        return plain;
    }
    let mut h: u32 = 0x811c_9dc5;
    for b in vif.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("ifb-{h:08x}")
}

fn check_name(name: &str) -> Result<(), NetbufError> {
    if name.is_empty() || name.len() > IFNAME_MAX || name.contains(['/', ' ', '\0']) {
        return Err(NetbufError::BadName(name.to_string()));
    }
    Ok(())
}

/// A guest interface's output held behind a plug qdisc. Torn down on drop.
#[derive(Debug)]
pub struct NetBuffer {
    rtnl: Rtnl,
    vif: String,
    vif_index: u32,
    ifb: String,
    ifb_index: u32,
    /// A mark is set and not released.
    pending: bool,
    /// Released indefinitely: frames pass.
    open: bool,
    /// Torn down (or kept on purpose): nothing left to do on drop.
    done: bool,
}

impl NetBuffer {
    /// Set the buffer up on `cfg.vif`: create the IFB, its plug qdisc (closed: frames are
    /// held from now on), bring it up, then the vif's ingress qdisc and its redirect. The
    /// kernel is asked for the IFB and the plug before the vif is touched, so a kernel
    /// without them leaves the vif as it was. On any error what was made is removed.
    pub fn setup(cfg: &Config) -> Result<Self, NetbufError> {
        check_name(&cfg.vif)?;
        let ifb = cfg.ifb.clone().unwrap_or_else(|| ifb_name(&cfg.vif));
        check_name(&ifb)?;
        let mut rtnl = Rtnl::open().map_err(|source| NetbufError::Netlink {
            op: "opening rtnetlink",
            iface: cfg.vif.clone(),
            source,
        })?;
        let vif_index = link_index(&mut rtnl, &cfg.vif)?
            .ok_or_else(|| NetbufError::VifMissing(cfg.vif.clone()))?;
        if link_index(&mut rtnl, &ifb)?.is_some() {
            return Err(NetbufError::IfbInUse(ifb));
        }
        create_ifb(&mut rtnl, &ifb)?;
        let ifb_index = match link_index(&mut rtnl, &ifb)? {
            Some(i) => i,
            None => return Err(NetbufError::IfbInUse(ifb)), // raced away: someone else's
        };
        let mut nb = NetBuffer {
            rtnl,
            vif: cfg.vif.clone(),
            vif_index,
            ifb,
            ifb_index,
            pending: false,
            open: false,
            done: false,
        };
        if let Err(e) = nb.plumb(cfg.limit) {
            nb.teardown_quietly();
            return Err(e);
        }
        tracing::info!(
            vif = %nb.vif,
            ifb = %nb.ifb,
            limit = cfg.limit,
            "network buffer set up: the guest's output on the vif is held until released"
        );
        Ok(nb)
    }

    /// The plug on the IFB, the IFB up, the vif's ingress redirected to it.
    fn plumb(&mut self, limit: u32) -> Result<(), NetbufError> {
        add_plug(&mut self.rtnl, self.ifb_index, &self.ifb, limit)?;
        set_up(&mut self.rtnl, self.ifb_index, &self.ifb)?;
        add_ingress(&mut self.rtnl, self.vif_index, &self.vif)?;
        add_redirect(&mut self.rtnl, self.vif_index, &self.vif, self.ifb_index)
    }

    /// The buffered interface.
    pub fn vif(&self) -> &str {
        &self.vif
    }

    /// The IFB device.
    pub fn ifb(&self) -> &str {
        &self.ifb
    }

    /// Whether a mark waits for its release.
    pub fn mark_pending(&self) -> bool {
        self.pending
    }

    /// `TCQ_PLUG_BUFFER`: mark the end of the frames queued so far (a checkpoint's epoch);
    /// the frames after it are held until a later mark is released. Closes an open plug.
    /// Refused while an earlier mark waits (see the module's notes).
    pub fn buffer(&mut self) -> Result<(), NetbufError> {
        self.live()?;
        if self.pending {
            return Err(NetbufError::MarkPending(self.ifb.clone()));
        }
        self.plug(TCQ_PLUG_BUFFER, "TCQ_PLUG_BUFFER")?;
        self.pending = true;
        self.open = false;
        Ok(())
    }

    /// `TCQ_PLUG_RELEASE_ONE`: let out the frames before the mark.
    pub fn release_one(&mut self) -> Result<(), NetbufError> {
        self.live()?;
        if !self.pending {
            return Err(NetbufError::NoMark(self.ifb.clone()));
        }
        self.plug(TCQ_PLUG_RELEASE_ONE, "TCQ_PLUG_RELEASE_ONE")?;
        self.pending = false;
        Ok(())
    }

    /// `TCQ_PLUG_RELEASE_INDEFINITE`: let everything out and hold nothing more, until the
    /// next [`NetBuffer::buffer`]. A no-op on an open plug.
    pub fn release_indefinite(&mut self) -> Result<(), NetbufError> {
        self.live()?;
        if self.open {
            return Ok(());
        }
        self.plug(TCQ_PLUG_RELEASE_INDEFINITE, "TCQ_PLUG_RELEASE_INDEFINITE")?;
        self.pending = false;
        self.open = true;
        Ok(())
    }

    fn live(&self) -> Result<(), NetbufError> {
        if self.done {
            return Err(NetbufError::TornDown(self.vif.clone()));
        }
        Ok(())
    }

    /// Change the plug qdisc with `action`.
    fn plug(&mut self, action: i32, op: &'static str) -> Result<(), NetbufError> {
        let mut m = TcMessage::with_index(index_i32(self.ifb_index));
        m.header.parent = TcHandle::ROOT;
        m.header.handle = PLUG_HANDLE;
        m.attributes.push(TcAttribute::Kind("plug".into()));
        m.attributes.push(plug_options(action, 0));
        self.rtnl
            .request(RouteNetlinkMessage::NewQueueDiscipline(m), 0)
            .map(drop)
            .map_err(|source| NetbufError::Netlink {
                op,
                iface: self.ifb.clone(),
                source,
            })
    }

    /// Remove the redirect (the vif's ingress qdisc) and the IFB; frames still held are
    /// dropped, never released. Errors are returned; the buffer counts as torn down anyway.
    pub fn teardown(mut self) -> Result<(), NetbufError> {
        self.done = true;
        let r = self.remove();
        if r.is_ok() {
            tracing::info!(vif = %self.vif, ifb = %self.ifb, "network buffer torn down");
        }
        r
    }

    /// Leave the buffer in the kernel as it is (a fenced guest's output stays held after
    /// this process ends); the operator removes it, see [`NetbufError::IfbInUse`].
    pub fn keep(mut self) {
        self.done = true;
        tracing::warn!(
            vif = %self.vif,
            ifb = %self.ifb,
            "network buffer left in place, plug closed: the guest's held output is never \
             released; remove it with `tc qdisc del dev {} ingress; ip link del {}`",
            self.vif,
            self.ifb
        );
    }

    fn remove(&mut self) -> Result<(), NetbufError> {
        let ingress = del_ingress(&mut self.rtnl, self.vif_index, &self.vif);
        let ifb = del_link(&mut self.rtnl, self.ifb_index, &self.ifb);
        ingress.and(ifb)
    }

    fn teardown_quietly(&mut self) {
        self.done = true;
        if let Err(e) = self.remove() {
            tracing::warn!(vif = %self.vif, ifb = %self.ifb, error = %e, "cannot remove the network buffer");
        }
    }
}

impl Drop for NetBuffer {
    fn drop(&mut self) {
        if !self.done {
            self.teardown_quietly();
        }
    }
}

/// Check that this kernel can buffer a vif, without touching one: create a scratch IFB
/// named `scratch` (≤ 15 bytes, unused), put a plug qdisc on it, an ingress qdisc and a
/// u32 filter with a mirred redirect to itself, and remove it. The error names the module
/// that is missing. For a host whose vif exists only later (the backup before failover).
pub fn probe(scratch: &str) -> Result<(), NetbufError> {
    check_name(scratch)?;
    let mut rtnl = Rtnl::open().map_err(|source| NetbufError::Netlink {
        op: "opening rtnetlink",
        iface: scratch.to_string(),
        source,
    })?;
    if link_index(&mut rtnl, scratch)?.is_some() {
        return Err(NetbufError::IfbInUse(scratch.to_string()));
    }
    create_ifb(&mut rtnl, scratch)?;
    let Some(index) = link_index(&mut rtnl, scratch)? else {
        return Err(NetbufError::IfbInUse(scratch.to_string()));
    };
    let r = add_plug(&mut rtnl, index, scratch, DEFAULT_LIMIT)
        .and_then(|()| add_ingress(&mut rtnl, index, scratch))
        .and_then(|()| add_redirect(&mut rtnl, index, scratch, index));
    let removed = del_link(&mut rtnl, index, scratch);
    r.and(removed)
}

/// Whether an interface named `name` exists in this thread's network namespace.
pub fn link_exists(name: &str) -> Result<bool, NetbufError> {
    check_name(name)?;
    let mut rtnl = Rtnl::open().map_err(|source| NetbufError::Netlink {
        op: "opening rtnetlink",
        iface: name.to_string(),
        source,
    })?;
    Ok(link_index(&mut rtnl, name)?.is_some())
}

/// The kinds of the qdiscs on interface `name` (e.g. `["ingress", "noqueue"]`), for
/// checks and tests.
pub fn qdisc_kinds(name: &str) -> Result<Vec<String>, NetbufError> {
    let mut rtnl = Rtnl::open().map_err(|source| NetbufError::Netlink {
        op: "opening rtnetlink",
        iface: name.to_string(),
        source,
    })?;
    let index = link_index(&mut rtnl, name)?.ok_or_else(|| NetbufError::VifMissing(name.into()))?;
    let all = rtnl
        .request(
            RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()),
            NLM_F_DUMP,
        )
        .map_err(|source| NetbufError::Netlink {
            op: "listing qdiscs",
            iface: name.to_string(),
            source,
        })?;
    Ok(all
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(q) if q.header.index == index_i32(index) => {
                q.attributes.into_iter().find_map(|a| match a {
                    TcAttribute::Kind(k) => Some(k),
                    _ => None,
                })
            }
            _ => None,
        })
        .collect())
}

/// A refused request: the module named by `missing` (what, module) when the kernel does
/// not know the kind asked for, otherwise the operation's error.
fn refused(
    e: NlError,
    op: &'static str,
    iface: &str,
    missing: (&'static str, &'static str),
) -> NetbufError {
    if matches!(e.errno(), Some(ENOENT | EOPNOTSUPP)) {
        NetbufError::ModuleMissing {
            what: missing.0,
            module: missing.1,
            source: e,
        }
    } else {
        NetbufError::Netlink {
            op,
            iface: iface.to_string(),
            source: e,
        }
    }
}

fn index_i32(index: u32) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

/// The index of interface `name`, or None if there is none.
fn link_index(rtnl: &mut Rtnl, name: &str) -> Result<Option<u32>, NetbufError> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    match rtnl.request(RouteNetlinkMessage::GetLink(m), 0) {
        Ok(msgs) => Ok(msgs.into_iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
            _ => None,
        })),
        Err(e) if e.errno() == Some(ENODEV) => Ok(None),
        Err(source) => Err(NetbufError::Netlink {
            op: "looking up",
            iface: name.to_string(),
            source,
        }),
    }
}

fn create_ifb(rtnl: &mut Rtnl, name: &str) -> Result<(), NetbufError> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Ifb)]));
    match rtnl.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL) {
        Ok(_) => Ok(()),
        Err(e) if e.errno() == Some(EEXIST) => Err(NetbufError::IfbInUse(name.to_string())),
        Err(e) => Err(refused(
            e,
            "creating the IFB device",
            name,
            ("IFB devices (intermediate functional block)", "ifb"),
        )),
    }
}

fn set_up(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<(), NetbufError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    rtnl.request(RouteNetlinkMessage::SetLink(m), 0)
        .map(drop)
        .map_err(|source| NetbufError::Netlink {
            op: "bringing up",
            iface: name.to_string(),
            source,
        })
}

fn del_link(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<(), NetbufError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    match rtnl.request(RouteNetlinkMessage::DelLink(m), 0) {
        Ok(_) => Ok(()),
        Err(e) if e.errno() == Some(ENODEV) => Ok(()), // gone already
        Err(source) => Err(NetbufError::Netlink {
            op: "deleting",
            iface: name.to_string(),
            source,
        }),
    }
}

/// `TCA_OPTIONS` of a plug qdisc: `struct tc_plug_qopt { int action; __u32 limit; }`.
fn plug_options(action: i32, limit: u32) -> TcAttribute {
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&action.to_ne_bytes());
    v.extend_from_slice(&limit.to_ne_bytes());
    TcAttribute::Other(DefaultNla::new(TCA_OPTIONS, v))
}

fn add_plug(rtnl: &mut Rtnl, ifb: u32, name: &str, limit: u32) -> Result<(), NetbufError> {
    let mut m = TcMessage::with_index(index_i32(ifb));
    m.header.parent = TcHandle::ROOT;
    m.header.handle = PLUG_HANDLE;
    m.attributes.push(TcAttribute::Kind("plug".into()));
    // The limit is read at creation; the action is ignored there.
    m.attributes.push(plug_options(TCQ_PLUG_BUFFER, limit));
    rtnl.request(
        RouteNetlinkMessage::NewQueueDiscipline(m),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
    .map_err(|e| refused(e, "adding the plug qdisc", name, ("plug qdisc", "sch_plug")))
}

fn add_ingress(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<(), NetbufError> {
    let mut m = TcMessage::with_index(index_i32(index));
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = INGRESS_HANDLE;
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    match rtnl.request(
        RouteNetlinkMessage::NewQueueDiscipline(m),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.errno() == Some(EEXIST) => Err(NetbufError::VifHasIngress(name.to_string())),
        Err(e) => Err(refused(
            e,
            "adding the ingress qdisc",
            name,
            ("ingress qdisc", "sch_ingress"),
        )),
    }
}

/// `tc filter add dev VIF parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred
/// egress redirect dev IFB`.
fn add_redirect(rtnl: &mut Rtnl, vif: u32, name: &str, ifb: u32) -> Result<(), NetbufError> {
    let mut m = TcMessage::with_index(index_i32(vif));
    m.header.parent = INGRESS_HANDLE;
    m.header.info = (FILTER_PRIO << 16) | u32::from(ETH_P_ALL.to_be());
    let mut generic = TcActionGeneric::default();
    generic.action = TcActionType::Stolen;
    let mut mirror = TcMirror::default();
    mirror.generic = generic;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = ifb;
    let mut action = TcAction::default();
    action.tab = 1;
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = 1;
    sel.keys = vec![TcU32Key::default()];
    m.attributes.push(TcAttribute::Kind("u32".into()));
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(sel)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    rtnl.request(
        RouteNetlinkMessage::NewTrafficFilter(m),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
    .map_err(|e| {
        // The kernel's extended ack tells a missing action from a missing classifier.
        let missing = if e.ext().is_some_and(|t| t.contains("action")) {
            ("mirred action", "act_mirred")
        } else {
            ("u32 classifier", "cls_u32")
        };
        refused(e, "adding the redirect filter", name, missing)
    })
}

fn del_ingress(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<(), NetbufError> {
    let mut m = TcMessage::with_index(index_i32(index));
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = INGRESS_HANDLE;
    match rtnl.request(RouteNetlinkMessage::DelQueueDiscipline(m), 0) {
        Ok(_) => Ok(()),
        // The vif is gone (the domain was destroyed) or has no ingress qdisc any more.
        Err(e) if matches!(e.errno(), Some(ENODEV | ENOENT | libc::EINVAL)) => Ok(()),
        Err(source) => Err(NetbufError::Netlink {
            op: "removing the ingress qdisc",
            iface: name.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifb_names_fit_the_kernels_limit() {
        assert_eq!(ifb_name("vif5.0"), "ifb-vif5.0");
        assert_eq!(ifb_name("castor-web"), "ifb-castor-web");
        let long = ifb_name("a-rather-long-vif");
        assert!(
            long.len() <= IFNAME_MAX && long.starts_with("ifb-"),
            "{long}"
        );
        assert_ne!(long, ifb_name("a-rather-long-vig"));
    }

    #[test]
    fn bad_names_are_refused_before_the_kernel_is_asked() {
        for n in ["", "sixteen-chars-xx", "a/b"] {
            assert!(matches!(check_name(n), Err(NetbufError::BadName(_))), "{n}");
        }
        check_name("vif1.0").unwrap();
    }

    #[test]
    fn plug_options_are_a_bare_tc_plug_qopt() {
        use netlink_packet_core::Emitable;
        let a = plug_options(TCQ_PLUG_RELEASE_ONE, 7);
        let mut buf = vec![0u8; a.buffer_len()];
        a.emit(&mut buf);
        // nla header (len 12, type TCA_OPTIONS), then action and limit.
        assert_eq!(&buf[..4], &[12, 0, 2, 0]);
        assert_eq!(&buf[4..8], &1i32.to_ne_bytes());
        assert_eq!(&buf[8..12], &7u32.to_ne_bytes());
    }
}
