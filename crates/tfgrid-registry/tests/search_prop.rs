//! The indexed search must return exactly what a brute-force filter over all nodes returns.

use proptest::prelude::*;
use std::collections::HashMap;
use tfgrid_core::capacity::GIB;
use tfgrid_core::filter::{NodeFilter, SortBy, SortOrder};
use tfgrid_core::records::{
    Farm, FarmIp, Gpu, Location, Node, NodeStatus, PublicConfig, RegistryConfig,
};
use tfgrid_core::Capacity;
use tfgrid_registry::index::{Delta, ReadModel};

const NOW: u64 = 1_000_000;
const DOWN_AFTER: u64 = 3_000;
const COUNTRIES: [&str; 4] = ["Belgium", "belgium", "Egypt", "Kenya"];
const CITIES: [&str; 3] = ["Ghent", "Cairo", ""];

fn arb_node(id: u32) -> impl Strategy<Value = Node> {
    (
        (1u32..=5, 1u64..=8, 1u64..=8, 0u64..=4, 0u64..=4),
        (0u64..=8, 0u64..=8, 0u64..=4, 0u64..=4),
        (
            0usize..4,
            0usize..3,
            any::<bool>(),
            any::<bool>(),
            0u64..=6_000,
        ),
    )
        .prop_map(
            move |((farm, cru, mru, sru, hru), (rc, rm, rs, rh), (country, city, gpu, gw, age))| {
                let total = Capacity {
                    cru,
                    mru: mru * GIB,
                    sru: sru * GIB,
                    hru: hru * GIB,
                    gpu: gpu as u32,
                    ipv4: 0,
                };
                let reserved = Capacity {
                    cru: rc.min(cru),
                    mru: rm.min(mru) * GIB,
                    sru: rs.min(sru) * GIB,
                    hru: rh.min(hru) * GIB,
                    gpu: 0,
                    ipv4: 0,
                };
                Node {
                    id,
                    workload_prefix: RegistryConfig::default()
                        .workload_range
                        .nth(24, u64::from(id) - 1)
                        .unwrap(),
                    farm_id: farm,
                    twin_id: 100 + id,
                    total,
                    reserved,
                    gpus: if gpu {
                        vec![Gpu {
                            vendor: "AMD".into(),
                            model: "MI".into(),
                            memory: GIB,
                        }]
                    } else {
                        vec![]
                    },
                    location: Location {
                        country: COUNTRIES[country].into(),
                        city: CITIES[city].into(),
                        latitude: None,
                        longitude: None,
                    },
                    public_config: PublicConfig {
                        domain: gw.then(|| "gw.test".into()),
                        ..Default::default()
                    },
                    created_at: 0,
                    updated_at: 0,
                    last_seen: NOW - age,
                    uptime: 0,
                    overlay: None,
                }
            },
        )
}

fn arb_nodes() -> impl Strategy<Value = Vec<Node>> {
    (0usize..60).prop_flat_map(|n| (1..=n as u32).map(arb_node).collect::<Vec<_>>())
}

fn arb_filter() -> impl Strategy<Value = NodeFilter> {
    let small = || proptest::option::of(0u64..=8);
    let gib = || proptest::option::of((0u64..=8).prop_map(|g| g * GIB));
    (
        (
            small(),
            gib(),
            gib(),
            gib(),
            small(),
            gib(),
            proptest::option::of(0u32..3),
        ),
        (
            proptest::option::of(prop_oneof![Just(NodeStatus::Up), Just(NodeStatus::Down)]),
            proptest::option::of(prop_oneof![
                Just("BELGIUM".to_string()),
                Just("egypt".to_string()),
                Just("Nowhere".to_string())
            ]),
            proptest::option::of(prop_oneof![Just("ghent".to_string()), Just("".to_string())]),
            proptest::option::of(proptest::collection::vec(1u32..=6, 0..3)),
            proptest::option::of(100u32..=170),
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>()),
        ),
        (
            proptest::option::of(proptest::collection::vec(0u32..=70, 0..6)),
            proptest::option::of(prop_oneof![
                Just(SortBy::NodeId),
                Just(SortBy::FreeCru),
                Just(SortBy::FreeMru),
                Just(SortBy::FreeSru),
                Just(SortBy::FreeHru),
                Just(SortBy::TotalCru),
                Just(SortBy::TotalMru),
                Just(SortBy::TotalSru),
                Just(SortBy::TotalHru),
            ]),
            proptest::option::of(prop_oneof![Just(SortOrder::Asc), Just(SortOrder::Desc)]),
            proptest::option::of(1u32..4),
            proptest::option::of(1u32..12),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (fc, fm, fs, fh, tc, tm, fip),
                (st, co, ci, farms, tw, gpu, dom),
                (ids, sb, so, page, size, rc),
            )| NodeFilter {
                free_cru: fc,
                free_mru: fm,
                free_sru: fs,
                free_hru: fh,
                total_cru: tc,
                total_mru: tm,
                free_ips: fip,
                status: st,
                country: co,
                city: ci,
                farm_ids: farms,
                twin_id: tw,
                has_gpu: gpu,
                domain: dom,
                node_ids: ids,
                sort_by: sb,
                sort_order: so,
                page,
                size,
                ret_count: rc,
                ..Default::default()
            },
        )
}

/// Farms 1..=5; farm k has k-1 free public ips (farm 1 none).
fn farms() -> Vec<Farm> {
    (1..=5u32)
        .map(|k| Farm {
            id: k,
            name: format!("farm{k}"),
            twin_id: 1,
            dedicated: false,
            public_ips: (0..k)
                .map(|i| FarmIp {
                    ip: format!("185.0.{k}.{i}/24"),
                    gateway: format!("185.0.{k}.254"),
                    contract_id: (i == 0).then_some(9),
                })
                .collect(),
            created_at: 0,
        })
        .collect()
}

fn brute(nodes: &[Node], f: &NodeFilter) -> (Vec<u32>, u64) {
    let free_ips: HashMap<u32, u32> = farms()
        .iter()
        .map(|f| {
            (
                f.id,
                f.public_ips
                    .iter()
                    .filter(|p| p.contract_id.is_none())
                    .count() as u32,
            )
        })
        .collect();
    let keep = |n: &&Node| {
        let free = n.total.saturating_sub(&n.reserved);
        let up = NOW - n.last_seen <= DOWN_AFTER;
        let ge = |w: Option<u64>, h: u64| w.is_none_or(|w| h >= w);
        ge(f.free_cru, free.cru)
            && ge(f.free_mru, free.mru)
            && ge(f.free_sru, free.sru)
            && ge(f.free_hru, free.hru)
            && ge(f.total_cru, n.total.cru)
            && ge(f.total_mru, n.total.mru)
            && ge(f.total_sru, n.total.sru)
            && ge(f.total_hru, n.total.hru)
            && f.free_ips.is_none_or(|w| free_ips[&n.farm_id] >= w)
            && f.status.is_none_or(|s| (s == NodeStatus::Up) == up)
            && f.country
                .as_ref()
                .is_none_or(|c| c.to_lowercase() == n.location.country.to_lowercase())
            && f.city
                .as_ref()
                .is_none_or(|c| c.to_lowercase() == n.location.city.to_lowercase())
            && f.farm_ids.as_ref().is_none_or(|v| v.contains(&n.farm_id))
            && f.twin_id.is_none_or(|t| t == n.twin_id)
            && f.has_gpu.is_none_or(|g| g != n.gpus.is_empty())
            && f.domain
                .is_none_or(|d| d == n.public_config.domain.is_some())
            && f.node_ids.as_ref().is_none_or(|v| v.contains(&n.id))
    };
    let mut hits: Vec<&Node> = nodes.iter().filter(keep).collect();
    let key = |n: &Node| {
        let free = n.total.saturating_sub(&n.reserved);
        match f.sort_by.unwrap_or(SortBy::NodeId) {
            SortBy::NodeId => n.id as u64,
            SortBy::FreeCru => free.cru,
            SortBy::FreeMru => free.mru,
            SortBy::FreeSru => free.sru,
            SortBy::FreeHru => free.hru,
            SortBy::TotalCru => n.total.cru,
            SortBy::TotalMru => n.total.mru,
            SortBy::TotalSru => n.total.sru,
            SortBy::TotalHru => n.total.hru,
        }
    };
    hits.sort_by_key(|n| (key(n), n.id));
    if f.sort_order == Some(SortOrder::Desc) {
        hits.reverse();
    }
    let size = f.size.unwrap_or(50) as usize;
    let skip = (f.page.unwrap_or(1) as usize - 1) * size;
    let count = hits.len() as u64;
    (
        hits.into_iter()
            .skip(skip)
            .take(size)
            .map(|n| n.id)
            .collect(),
        count,
    )
}

fn model(nodes: &[Node]) -> ReadModel {
    let mut m = ReadModel::new(RegistryConfig {
        down_after_ms: DOWN_AFTER,
        ..Default::default()
    });
    m.apply(Delta {
        height: 1,
        farms: farms(),
        nodes: nodes.to_vec(),
        ..Default::default()
    });
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn indexed_search_equals_brute_force(nodes in arb_nodes(), filters in proptest::collection::vec(arb_filter(), 8)) {
        let mut m = model(&nodes);
        for limit in [None, Some(0)] {
            m.candidate_limit = limit;
            for f in &filters {
                let (page, count) = m.search(f, NOW);
                let (want, want_count) = brute(&nodes, f);
                prop_assert_eq!(page.iter().map(|v| v.node.id).collect::<Vec<_>>(), want, "filter {:?} limit {:?}", f, limit);
                prop_assert_eq!(count, f.ret_count.then_some(want_count), "count for {:?}", f);
                for v in &page {
                    let n = &nodes[v.node.id as usize - 1];
                    prop_assert_eq!(v.free.cru, n.total.cru - n.reserved.cru);
                    prop_assert_eq!(v.status == NodeStatus::Up, NOW - n.last_seen <= DOWN_AFTER);
                }
                // The HTTP body is spliced from pre-rendered JSON: it must say exactly what the
                // views say.
                let (ids, _) = m.search_ids(f, NOW);
                let rendered: Vec<tfgrid_core::records::NodeView> = serde_json::from_str(&m.render_views(&ids, NOW)).unwrap();
                prop_assert_eq!(rendered, page);
            }
        }
    }

    /// Records replaced after the first load (reservations changing, nodes moving farm) must leave
    /// no stale entries behind in any index.
    #[test]
    fn updates_leave_no_stale_index_entries(before in arb_nodes(), after_seed in arb_nodes(), filters in proptest::collection::vec(arb_filter(), 6)) {
        let mut m = model(&before);
        // Replace each node that exists in both with the second version.
        let after: Vec<Node> = before
            .iter()
            .map(|b| after_seed.iter().find(|a| a.id == b.id).cloned().unwrap_or_else(|| b.clone()))
            .collect();
        m.apply(Delta { height: 2, nodes: after.clone(), ..Default::default() });
        m.candidate_limit = Some(0);
        for f in &filters {
            let (page, count) = m.search(f, NOW);
            let (want, want_count) = brute(&after, f);
            prop_assert_eq!(page.iter().map(|v| v.node.id).collect::<Vec<_>>(), want, "filter {:?}", f);
            prop_assert_eq!(count, f.ret_count.then_some(want_count));
        }
    }
}
