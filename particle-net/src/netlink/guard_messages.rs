//! Builders for the messages that lock a bridge port to the one endpoint
//! behind it (see [`crate::guard`]): bridge port flags, a static FDB entry,
//! a `clsact` qdisc and a classic-BPF filter on the port's ingress.
//!
//! netlink-packet-route 0.34 knows `cls_bpf` but not its classic-BPF
//! attributes (`TCA_BPF_OPS_LEN`, `TCA_BPF_OPS`); those two are passed as
//! raw attributes. Classic BPF because the program travels inside the
//! netlink message: no `bpf()` syscall, no program fd to keep, and it goes
//! with the port when the port is deleted.

use netlink_packet_core::DefaultNla;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::link::{
    InfoBridgePort, InfoPortData, InfoPortKind, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpf, TcFilterBpfOption, TcHandle, TcHeader, TcMessage,
    TcOption,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// `TCA_BPF_OPS_LEN` and `TCA_BPF_OPS` (linux/pkt_cls.h).
const TCA_BPF_OPS_LEN: u16 = 4;
const TCA_BPF_OPS: u16 = 5;
/// `ETH_P_ALL`: a filter that sees every frame.
const ETH_P_ALL: u16 = 0x0003;

/// Bridge port flags of an endpoint's port: it learns nothing (so no frame
/// it sends can add or move an FDB entry), gets no flooded unknown unicast
/// (nobody else's traffic leaks to it), and is locked: the bridge forwards
/// a frame from it only if its source MAC has an FDB entry on this port.
/// `ip link set PORT type bridge_slave learning off flood off locked on`:
/// an RTM_NEWLINK without NLM_F_CREATE on the existing link.
pub fn lock_bridge_port(index: u32) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes = vec![LinkAttribute::LinkInfo(vec![
        LinkInfo::PortKind(InfoPortKind::Bridge),
        LinkInfo::PortData(InfoPortData::BridgePort(vec![
            InfoBridgePort::Learning(false),
            InfoBridgePort::UnicastFlood(false),
            InfoBridgePort::Locked(true),
        ])),
    ])];
    RouteNetlinkMessage::NewLink(msg)
}

/// `bridge fdb add MAC dev PORT master static sticky`: frames for `mac` go
/// to `port`, and the entry never moves to another port.
pub fn static_fdb(port: u32, mac: [u8; 6]) -> RouteNetlinkMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = port;
    // NOARP is "static"; PERMANENT would make it a local (to-the-bridge) entry.
    msg.header.state = NeighbourState::Noarp;
    msg.header.flags = NeighbourFlags::Controller | NeighbourFlags::Sticky;
    msg.attributes = vec![NeighbourAttribute::LinkLayerAddress(mac.to_vec())];
    RouteNetlinkMessage::NewNeighbour(msg)
}

/// A `clsact` qdisc on the link: a place for ingress filters.
pub fn clsact(index: u32) -> RouteNetlinkMessage {
    let mut msg = TcMessage::default();
    msg.header = TcHeader {
        index: index as i32,
        handle: TcHandle {
            major: u16::MAX,
            minor: 0,
        },
        parent: TcHandle::CLSACT,
        ..TcHeader::default()
    };
    msg.attributes = vec![TcAttribute::Kind("clsact".into())];
    RouteNetlinkMessage::NewQueueDiscipline(msg)
}

/// A `cls_bpf` filter on the link's ingress (its `clsact`), every protocol,
/// running `program` in direct-action mode: its return value is the verdict
/// (`TC_ACT_OK`, `TC_ACT_SHOT`).
pub fn ingress_bpf(index: u32, priority: u16, program: &[SockFilter]) -> RouteNetlinkMessage {
    let mut ops = Vec::with_capacity(program.len() * 8);
    for i in program {
        ops.extend_from_slice(&i.code.to_ne_bytes());
        ops.push(i.jt);
        ops.push(i.jf);
        ops.extend_from_slice(&i.k.to_ne_bytes());
    }
    // A program is at most BPF_MAXINSNS (4096) long; ours are ~25.
    let len = u16::try_from(program.len()).unwrap_or(u16::MAX);
    let mut msg = TcMessage::default();
    msg.header = TcHeader {
        index: index as i32,
        parent: TcHandle {
            major: u16::MAX,
            minor: TcHandle::MIN_INGRESS,
        },
        // TC_H_MAKE(priority << 16, htons(protocol)).
        info: (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be()),
        ..TcHeader::default()
    };
    msg.attributes = vec![
        TcAttribute::Kind(TcFilterBpf::KIND.into()),
        TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
            TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(
                TCA_BPF_OPS_LEN,
                len.to_ne_bytes().to_vec(),
            ))),
            TcOption::Bpf(TcFilterBpfOption::Other(DefaultNla::new(TCA_BPF_OPS, ops))),
        ]),
    ];
    RouteNetlinkMessage::NewTrafficFilter(msg)
}
