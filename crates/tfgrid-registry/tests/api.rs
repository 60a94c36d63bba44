//! Every transaction kind and every refusal, over real HTTP against a real store.

mod common;
use common::*;
use tfgrid_core::capacity::GIB;
use tfgrid_core::contract::ContractState;
use tfgrid_core::filter::{ContractFilter, NodeFilter};
use tfgrid_core::records::{NodeStatus, Overlay, RegistryConfig, X25519Key};
use tfgrid_core::tx::{Call, Outcome, SignedTx, Tx};
use tfgrid_core::{Capacity, Hash, Identity};

fn cap(cru: u64, mru_gib: u64) -> Capacity {
    Capacity {
        cru,
        mru: mru_gib * GIB,
        ..Default::default()
    }
}

#[tokio::test]
async fn twins_create_update_and_lookup() {
    let g = start_default().await;
    let mut a = Actor::new();
    let acct = g.client.account(&a.id.public_key()).await.unwrap();
    assert_eq!((acct.nonce, acct.twin_id), (0, None));
    let id = a.twin(&g).await;
    let t = g.client.twin(id).await.unwrap();
    assert_eq!(t.public_key, a.id.public_key());
    assert_eq!(t.relay, "ws://127.0.0.1:1");
    assert_eq!(
        g.client
            .twin_by_key(&a.id.public_key())
            .await
            .unwrap()
            .unwrap()
            .id,
        id
    );

    a.ok(
        &g,
        Call::UpdateTwin {
            relay: "ws://relay.example:443".into(),
            enc_key: Some(X25519Key([5; 32])),
        },
    )
    .await;
    let t = g.client.twin(id).await.unwrap();
    assert_eq!(t.relay, "ws://relay.example:443");
    assert_eq!(t.enc_key, Some(X25519Key([5; 32])));

    let again = a
        .send(
            &g,
            Call::CreateTwin {
                relay: String::new(),
                enc_key: None,
            },
        )
        .await;
    assert_refused(again, 409, "conflict", "already has twin");
    let bad = a
        .send(
            &g,
            Call::UpdateTwin {
                relay: "ws://a b".into(),
                enc_key: None,
            },
        )
        .await;
    assert_refused(bad, 400, "malformed", "whitespace");
    assert_eq!(
        g.client.account(&a.id.public_key()).await.unwrap().nonce,
        2,
        "refusals consume no nonce"
    );

    let mut b = Actor::new();
    assert_eq!(b.twin(&g).await, id + 1, "twin ids are sequential");
    assert_refused(g.client.twin(999).await, 404, "not_found", "twin 999");
}

#[tokio::test]
async fn replay_and_stale_nonces_are_refused() {
    let g = start_default().await;
    let mut a = Actor::new();
    let first = a.sign(Call::CreateTwin {
        relay: String::new(),
        enc_key: None,
    });
    g.client.submit(&first).await.unwrap();
    assert_refused(g.client.submit(&first).await, 409, "nonce", "replayed");

    let five = SignedTx::new(
        &a.id,
        5,
        Call::UpdateTwin {
            relay: "ws://x".into(),
            enc_key: None,
        },
    );
    g.client.submit(&five).await.unwrap();
    let three = SignedTx::new(
        &a.id,
        3,
        Call::UpdateTwin {
            relay: "ws://y".into(),
            enc_key: None,
        },
    );
    assert_refused(g.client.submit(&three).await, 409, "nonce", "last nonce 5");
    assert_refused(g.client.submit(&five).await, 409, "nonce", "last nonce 5");
    assert_eq!(g.client.twin(1).await.unwrap().relay, "ws://x");
}

/// A nonce far ahead (u64::MAX) would leave a key no nonce to sign with: refused, and the key
/// goes on working.
#[tokio::test]
async fn a_nonce_that_would_use_up_the_key_is_refused() {
    let g = start_default().await;
    let mut a = Actor::new();
    a.twin(&g).await;
    let upd = |n: u64| {
        SignedTx::new(
            &a.id,
            n,
            Call::UpdateTwin {
                relay: "ws://x".into(),
                enc_key: None,
            },
        )
    };
    assert_refused(
        g.client.submit(&upd(u64::MAX)).await,
        400,
        "malformed",
        "use up",
    );
    assert_refused(
        g.client.submit(&upd(2 + (1 << 20))).await,
        400,
        "malformed",
        "past",
    );
    g.client.submit(&upd(2 + 1000)).await.unwrap();
    assert_eq!(
        g.client.account(&a.id.public_key()).await.unwrap().nonce,
        1002
    );
}

/// A twin's relay is dialled by others: only ws:// and wss:// addresses of a host are taken.
#[tokio::test]
async fn relay_addresses_must_be_websocket_urls() {
    let g = start_default().await;
    let mut a = Actor::new();
    a.twin(&g).await;
    for bad in [
        "javascript:alert(1)",
        "http://x",
        "ws://",
        "file:///etc/passwd",
        "ws://h:70000/",
    ] {
        let r = a
            .send(
                &g,
                Call::UpdateTwin {
                    relay: bad.into(),
                    enc_key: None,
                },
            )
            .await;
        assert_refused(r, 400, "malformed", "relay address");
    }
    let r = Actor::new()
        .send(
            &g,
            Call::CreateTwin {
                relay: "javascript:x".into(),
                enc_key: None,
            },
        )
        .await;
    assert_refused(r, 400, "malformed", "ws://");
    assert_eq!(g.client.twin(1).await.unwrap().relay, "ws://127.0.0.1:1");
}

/// Requests too large in any part are refused with the documented JSON, and a full batch of
/// 10,000 transactions fits.
#[tokio::test]
async fn oversized_requests_get_json_errors_and_a_full_batch_fits() {
    let g = start_default().await;
    let http = reqwest::Client::new();
    let json_error = |r: reqwest::Response, status: u16| async move {
        assert_eq!(r.status(), status);
        let e: tfgrid_core::records::ErrorBody = r.json().await.expect("a JSON error body");
        assert_eq!(e.error, "too_large", "{}", e.message);
    };
    let r = http
        .post(format!("{}/tx", g.url))
        .body(vec![b' '; 300 << 10])
        .send()
        .await
        .unwrap();
    json_error(r, 413).await;
    let r = http
        .get(format!("{}/nodes?{}", g.url, "x".repeat(10_000)))
        .send()
        .await
        .unwrap();
    json_error(r, 414).await;
    let r = http
        .get(format!("{}/stats", g.url))
        .header("x-big", "y".repeat(40_000))
        .send()
        .await
        .unwrap();
    json_error(r, 431).await;

    let mut a = Actor::new();
    let mut txs = vec![a.sign(Call::CreateTwin {
        relay: String::new(),
        enc_key: None,
    })];
    for i in 0..9_999 {
        txs.push(a.sign(Call::UpdateTwin {
            relay: format!("ws://relay{i}.example:443/"),
            enc_key: None,
        }));
    }
    let out = g.client.submit_batch(&txs).await.unwrap();
    assert_eq!(out.len(), 10_000);
    assert!(out
        .iter()
        .all(|r| matches!(r, tfgrid_registry_client::BatchResult::Ok(_))));
    assert_eq!(
        g.client.twin(1).await.unwrap().relay,
        "ws://relay9998.example:443/"
    );
}

#[tokio::test]
async fn bad_signatures_are_refused_and_change_nothing() {
    let g = start_default().await;
    let mut a = Actor::new();
    a.twin(&g).await;

    // A relay rewrites the body after signing.
    let mut forged = a.sign(Call::UpdateTwin {
        relay: "ws://mine".into(),
        enc_key: None,
    });
    forged.tx.call = Call::UpdateTwin {
        relay: "ws://attacker".into(),
        enc_key: None,
    };
    assert_refused(
        g.client.submit(&forged).await,
        401,
        "bad_signature",
        "signature",
    );

    // Someone signs in another key's name.
    let mallory = Identity::generate();
    let tx = Tx {
        signer: a.id.public_key(),
        nonce: 10,
        call: Call::UpdateTwin {
            relay: "ws://m".into(),
            enc_key: None,
        },
    };
    let stolen = SignedTx {
        signature: mallory.sign(&tx.signing_bytes()),
        tx,
    };
    assert_refused(
        g.client.submit(&stolen).await,
        401,
        "bad_signature",
        &a.id.public_key().to_hex(),
    );

    // Not a valid curve point as a signer.
    let tx = Tx {
        signer: tfgrid_core::PublicKey([0xff; 32]),
        nonce: 1,
        call: Call::CreateTwin {
            relay: String::new(),
            enc_key: None,
        },
    };
    let junk = SignedTx {
        signature: mallory.sign(&tx.signing_bytes()),
        tx,
    };
    assert_refused(g.client.submit(&junk).await, 401, "bad_signature", "");

    let t = g.client.twin(1).await.unwrap();
    assert_eq!(t.relay, "ws://127.0.0.1:1");
    assert_eq!(g.client.account(&a.id.public_key()).await.unwrap().nonce, 1);
    assert_eq!(g.client.stats().await.unwrap().height, 1);
}

#[tokio::test]
async fn malformed_bodies_get_400_with_a_reason() {
    let g = start_default().await;
    let http = reqwest::Client::new();
    for (ctype, body, needle) in [
        (
            "application/json",
            b"{not json".to_vec(),
            "transaction JSON",
        ),
        (
            "application/json",
            br#"{"tx":{"signer":"zz","nonce":1,"call":"x"},"signature":"00"}"#.to_vec(),
            "transaction JSON",
        ),
        (
            "application/x-tfgrid-tx",
            vec![1, 2, 3],
            "binary transaction",
        ),
        ("application/x-tfgrid-tx", vec![], "binary transaction"),
    ] {
        let r = http
            .post(format!("{}/tx", g.url))
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let e: tfgrid_core::records::ErrorBody = r.json().await.unwrap();
        assert_eq!(e.error, "malformed");
        assert!(e.message.contains(needle), "{}", e.message);
    }
    let r = http
        .get(format!("{}/nodes?free_mr=3", g.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("unknown field"));
    let r = http
        .get(format!("{}/nodes?size=0", g.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{}/nodes/abc", g.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{}/accounts/xyz", g.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{}/contracts?state=maybe", g.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(g.client.stats().await.unwrap().height, 0);
}

#[tokio::test]
async fn binary_transactions_are_accepted() {
    let g = start_default().await;
    let mut a = Actor::new();
    let stx = a.sign(Call::CreateTwin {
        relay: String::new(),
        enc_key: None,
    });
    let r = g.client.submit_binary(&stx).await.unwrap();
    assert_eq!(r.outcome, Outcome::TwinCreated { twin_id: 1 });
    assert_eq!(r.tx_hash, stx.hash());
}

#[tokio::test]
async fn farms_and_their_public_ips() {
    let g = start_default().await;
    let mut keyless = Actor::new();
    let r = keyless
        .send(
            &g,
            Call::CreateFarm {
                name: "nope_farm".into(),
                dedicated: false,
            },
        )
        .await;
    assert_refused(r, 403, "forbidden", "has no twin");

    let mut f = Actor::new();
    let twin = f.twin(&g).await;
    let farm = f.farm(&g, "freefarm").await;
    assert_refused(
        f.send(
            &g,
            Call::CreateFarm {
                name: "FreeFarm".into(),
                dedicated: false,
            },
        )
        .await,
        409,
        "conflict",
        "taken",
    );
    assert_refused(
        f.send(
            &g,
            Call::CreateFarm {
                name: "x".into(),
                dedicated: false,
            },
        )
        .await,
        400,
        "malformed",
        "3 to 40",
    );
    assert_refused(
        f.send(
            &g,
            Call::CreateFarm {
                name: "bad name!".into(),
                dedicated: false,
            },
        )
        .await,
        400,
        "malformed",
        "farm name",
    );

    f.ok(
        &g,
        Call::UpdateFarm {
            farm_id: farm,
            name: "greenfarm".into(),
            dedicated: true,
        },
    )
    .await;
    let got = g.client.farm(farm).await.unwrap();
    assert_eq!(
        (got.name.as_str(), got.dedicated, got.twin_id),
        ("greenfarm", true, twin)
    );
    assert!(g.client.farm_by_name("freefarm").await.unwrap().is_none());
    assert_eq!(
        g.client
            .farm_by_name("GREENFARM")
            .await
            .unwrap()
            .unwrap()
            .id,
        farm
    );

    let mut other = Actor::new();
    other.twin(&g).await;
    let r = other
        .send(
            &g,
            Call::UpdateFarm {
                farm_id: farm,
                name: "stolen".into(),
                dedicated: false,
            },
        )
        .await;
    assert_refused(r, 403, "forbidden", "belongs to twin");
    let r = other
        .send(
            &g,
            Call::AddFarmIp {
                farm_id: farm,
                ip: "185.1.1.5/24".into(),
                gateway: "185.1.1.1".into(),
            },
        )
        .await;
    assert_refused(r, 403, "forbidden", "belongs to twin");
    assert_refused(
        f.send(
            &g,
            Call::UpdateFarm {
                farm_id: 77,
                name: "ghost".into(),
                dedicated: false,
            },
        )
        .await,
        404,
        "not_found",
        "farm 77",
    );

    f.ok(
        &g,
        Call::AddFarmIp {
            farm_id: farm,
            ip: "185.1.1.5/24".into(),
            gateway: "185.1.1.1".into(),
        },
    )
    .await;
    let r = f
        .send(
            &g,
            Call::AddFarmIp {
                farm_id: farm,
                ip: "185.1.1.5/24".into(),
                gateway: "185.1.1.1".into(),
            },
        )
        .await;
    assert_refused(r, 409, "conflict", "already has");
    let r = f
        .send(
            &g,
            Call::AddFarmIp {
                farm_id: farm,
                ip: "185.1.1.6/24".into(),
                gateway: "10.0.0.1".into(),
            },
        )
        .await;
    assert_refused(r, 400, "malformed", "outside");
    let r = f
        .send(
            &g,
            Call::AddFarmIp {
                farm_id: farm,
                ip: "185.1.1.300/24".into(),
                gateway: "185.1.1.1".into(),
            },
        )
        .await;
    assert_refused(r, 400, "malformed", "IPv4 with prefix");
    f.ok(
        &g,
        Call::AddFarmIp {
            farm_id: farm,
            ip: "185.1.1.6/24".into(),
            gateway: "185.1.1.1".into(),
        },
    )
    .await;
    f.ok(
        &g,
        Call::RemoveFarmIp {
            farm_id: farm,
            ip: "185.1.1.6/24".into(),
        },
    )
    .await;
    let r = f
        .send(
            &g,
            Call::RemoveFarmIp {
                farm_id: farm,
                ip: "185.1.1.6/24".into(),
            },
        )
        .await;
    assert_refused(r, 404, "not_found", "no ip");
    assert_eq!(g.client.farm(farm).await.unwrap().public_ips.len(), 1);
    assert_eq!(g.client.farms_of(twin).await.unwrap().len(), 1);
}

#[tokio::test]
async fn nodes_register_update_and_report_uptime() {
    let g = start(RegistryConfig {
        down_after_ms: 600,
        report_interval_ms: 200,
        ..Default::default()
    })
    .await;
    let mut farmer = Actor::new();
    farmer.twin(&g).await;
    let farm = farmer.farm(&g, "nodefarm").await;
    let mut n = Actor::new();
    n.twin(&g).await;

    assert_refused(
        n.send(&g, Call::RegisterNode(spec(99, 4, 8))).await,
        404,
        "not_found",
        "farm 99",
    );
    let mut tiny = spec(farm, 0, 8);
    assert_refused(
        n.send(&g, Call::RegisterNode(tiny.clone())).await,
        400,
        "malformed",
        "cru",
    );
    tiny = spec(farm, 2, 8);
    tiny.total.ipv4 = 2;
    assert_refused(
        n.send(&g, Call::RegisterNode(tiny)).await,
        400,
        "malformed",
        "belong to the farm",
    );
    let mut gpu_lie = spec(farm, 2, 8);
    gpu_lie.total.gpu = 1;
    assert_refused(
        n.send(&g, Call::RegisterNode(gpu_lie)).await,
        400,
        "malformed",
        "gpus",
    );
    let mut bad_loc = spec(farm, 2, 8);
    bad_loc.location.latitude = Some(123.0);
    assert_refused(
        n.send(&g, Call::RegisterNode(bad_loc)).await,
        400,
        "malformed",
        "latitude",
    );
    let mut bad_domain = spec(farm, 2, 8);
    bad_domain.public_config.domain = Some("-bad..domain".into());
    assert_refused(
        n.send(&g, Call::RegisterNode(bad_domain)).await,
        400,
        "malformed",
        "DNS",
    );

    let id = match n.ok(&g, Call::RegisterNode(spec(farm, 4, 8))).await {
        Outcome::NodeRegistered { node_id } => node_id,
        o => panic!("{o:?}"),
    };
    let v = g.client.node(id).await.unwrap();
    assert_eq!(v.status, NodeStatus::Up);
    assert_eq!(
        v.free,
        Capacity {
            ipv4: 0,
            ..v.node.total
        }
    );
    assert_eq!(v.node.location.city, "Ghent");

    // Re-registering updates the same node (a restarted agent, or new hardware).
    let mut bigger = spec(farm, 8, 16);
    bigger.public_config.domain = Some("gw1.grid.test".into());
    assert_eq!(
        n.ok(&g, Call::RegisterNode(bigger)).await,
        Outcome::NodeUpdated { node_id: id }
    );
    let v = g.client.node(id).await.unwrap();
    assert_eq!(
        (v.node.total.cru, v.node.public_config.domain.as_deref()),
        (8, Some("gw1.grid.test"))
    );
    assert_eq!(g.client.stats().await.unwrap().nodes, 1);

    // Only nodes report uptime.
    assert_refused(
        farmer.send(&g, Call::ReportUptime { uptime: 5 }).await,
        403,
        "forbidden",
        "not a node",
    );

    // Silence -> down; a report -> up again.
    sleep_ms(900).await;
    assert_eq!(g.client.node(id).await.unwrap().status, NodeStatus::Down);
    let down = g
        .client
        .nodes(&NodeFilter {
            status: Some(NodeStatus::Down),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(down.nodes.len(), 1);
    n.ok(&g, Call::ReportUptime { uptime: 42 }).await;
    let v = g.client.node(id).await.unwrap();
    assert_eq!((v.status, v.node.uptime), (NodeStatus::Up, 42));
    assert_eq!(g.client.stats().await.unwrap().nodes_up, 1);
    assert_refused(g.client.node(77).await, 404, "not_found", "node 77");
}

#[tokio::test]
async fn node_contracts_reserve_and_release_capacity() {
    let g = start_default().await;
    let (mut farmer, farm, _n, node) = farm_with_node(&g, 4, 8).await;
    farmer
        .ok(
            &g,
            Call::AddFarmIp {
                farm_id: farm,
                ip: "185.2.2.10/24".into(),
                gateway: "185.2.2.1".into(),
            },
        )
        .await;
    let mut user = Actor::new();
    let user_twin = user.twin(&g).await;
    let h1 = Hash([1; 32]);

    let want = Capacity {
        ipv4: 1,
        ..cap(3, 6)
    };
    let (c1, ips) = match user
        .ok(
            &g,
            Call::CreateNodeContract {
                node_id: node,
                deployment_hash: h1,
                capacity: want,
            },
        )
        .await
    {
        Outcome::ContractCreated {
            contract_id,
            public_ips,
        } => (contract_id, public_ips),
        o => panic!("{o:?}"),
    };
    assert_eq!(ips, vec!["185.2.2.10/24".to_string()]);
    let v = g.client.node(node).await.unwrap();
    assert_eq!((v.free.cru, v.free.mru, v.free.ipv4), (1, 2 * GIB, 0));
    assert_eq!(
        g.client.farm(farm).await.unwrap().public_ips[0].contract_id,
        Some(c1)
    );

    // Over capacity: the error says which unit is short; nothing is reserved.
    let r = user
        .send(
            &g,
            Call::CreateNodeContract {
                node_id: node,
                deployment_hash: Hash([2; 32]),
                capacity: cap(2, 1),
            },
        )
        .await;
    assert_refused(r, 409, "capacity", "cru: want 2, free 1");
    let r = user
        .send(
            &g,
            Call::CreateNodeContract {
                node_id: node,
                deployment_hash: Hash([2; 32]),
                capacity: Capacity {
                    ipv4: 1,
                    ..cap(1, 1)
                },
            },
        )
        .await;
    assert_refused(r, 409, "capacity", "ipv4: want 1, free 0");
    let r = user
        .send(
            &g,
            Call::CreateNodeContract {
                node_id: node,
                deployment_hash: h1,
                capacity: cap(1, 1),
            },
        )
        .await;
    assert_refused(r, 409, "conflict", "already holds deployment");
    let r = user
        .send(
            &g,
            Call::CreateNodeContract {
                node_id: 99,
                deployment_hash: h1,
                capacity: cap(1, 1),
            },
        )
        .await;
    assert_refused(r, 404, "not_found", "node 99");
    assert_eq!(g.client.node(node).await.unwrap().node.reserved, want);

    // A node cannot shrink below what contracts hold.
    let mut shrink = _n;
    let r = shrink.send(&g, Call::RegisterNode(spec(farm, 2, 8))).await;
    assert_refused(r, 409, "conflict", "below what live contracts reserve");

    // Only the owner updates or cancels.
    let mut other = Actor::new();
    other.twin(&g).await;
    assert_refused(
        other
            .send(&g, Call::CancelContract { contract_id: c1 })
            .await,
        403,
        "forbidden",
        "belongs to twin",
    );
    let r = other
        .send(
            &g,
            Call::UpdateNodeContract {
                contract_id: c1,
                deployment_hash: h1,
                capacity: cap(1, 1),
            },
        )
        .await;
    assert_refused(r, 403, "forbidden", "belongs to twin");

    // Update: grow within the node, drop the ip, new hash.
    let h2 = Hash([3; 32]);
    user.ok(
        &g,
        Call::UpdateNodeContract {
            contract_id: c1,
            deployment_hash: h2,
            capacity: cap(4, 8),
        },
    )
    .await;
    let v = g.client.node(node).await.unwrap();
    assert_eq!((v.free.cru, v.free.mru, v.free.ipv4), (0, 0, 1));
    let c = g.client.contract(c1).await.unwrap();
    assert_eq!(c.node().unwrap().deployment_hash, h2);
    assert!(c.node().unwrap().public_ips.is_empty());
    let r = user
        .send(
            &g,
            Call::UpdateNodeContract {
                contract_id: c1,
                deployment_hash: h2,
                capacity: cap(5, 8),
            },
        )
        .await;
    assert_refused(r, 409, "capacity", "cru: want 5, free 4");

    // Cancel releases everything; a second cancel is a conflict.
    user.ok(&g, Call::CancelContract { contract_id: c1 }).await;
    let v = g.client.node(node).await.unwrap();
    assert_eq!(v.node.reserved, Capacity::default());
    assert_eq!(v.free.ipv4, 1);
    assert!(matches!(
        g.client.contract(c1).await.unwrap().state,
        ContractState::Deleted { .. }
    ));
    assert_refused(
        user.send(&g, Call::CancelContract { contract_id: c1 })
            .await,
        409,
        "conflict",
        "already canceled",
    );
    assert_refused(
        user.send(&g, Call::CancelContract { contract_id: 555 })
            .await,
        404,
        "not_found",
        "contract 555",
    );

    // The same hash may be used again once its contract is gone.
    user.ok(
        &g,
        Call::CreateNodeContract {
            node_id: node,
            deployment_hash: h2,
            capacity: cap(1, 1),
        },
    )
    .await;
    let mine = g
        .client
        .contracts(&ContractFilter {
            twin_id: Some(user_twin),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(mine.len(), 2);
    let live = g
        .client
        .contracts(&ContractFilter {
            node_id: Some(node),
            state: Some("live".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    let stats = g.client.stats().await.unwrap();
    assert_eq!((stats.node_contracts_live, stats.reserved.cru), (1, 1));
}

#[tokio::test]
async fn contracts_on_down_nodes_are_refused() {
    let g = start(RegistryConfig {
        down_after_ms: 300,
        report_interval_ms: 100,
        ..Default::default()
    })
    .await;
    let (_f, _farm, _n, node) = farm_with_node(&g, 4, 8).await;
    let mut user = Actor::new();
    user.twin(&g).await;
    sleep_ms(600).await;
    let r = user
        .send(
            &g,
            Call::CreateNodeContract {
                node_id: node,
                deployment_hash: Hash([1; 32]),
                capacity: cap(1, 1),
            },
        )
        .await;
    assert_refused(r, 409, "conflict", "is down");
}

#[tokio::test]
async fn name_contracts_are_unique_while_live() {
    let g = start_default().await;
    let mut a = Actor::new();
    a.twin(&g).await;
    let mut b = Actor::new();
    b.twin(&g).await;
    let c = match a
        .ok(&g, Call::CreateNameContract { name: "web".into() })
        .await
    {
        Outcome::ContractCreated { contract_id, .. } => contract_id,
        o => panic!("{o:?}"),
    };
    assert_refused(
        b.send(&g, Call::CreateNameContract { name: "web".into() })
            .await,
        409,
        "conflict",
        "held by contract",
    );
    assert_refused(
        b.send(
            &g,
            Call::CreateNameContract {
                name: "Web.site".into(),
            },
        )
        .await,
        400,
        "malformed",
        "a-z 0-9",
    );
    assert_refused(
        b.send(&g, Call::CreateNameContract { name: "ab".into() })
            .await,
        400,
        "malformed",
        "3 to 64",
    );
    let held = g
        .client
        .contracts(&ContractFilter {
            name: Some("web".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].id, c);
    assert_refused(
        b.send(&g, Call::CancelContract { contract_id: c }).await,
        403,
        "forbidden",
        "belongs",
    );
    a.ok(&g, Call::CancelContract { contract_id: c }).await;
    assert!(g
        .client
        .contracts(&ContractFilter {
            name: Some("web".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty());
    b.ok(&g, Call::CreateNameContract { name: "web".into() })
        .await;
}

#[tokio::test]
async fn farm_change_with_live_contracts_is_refused() {
    let g = start_default().await;
    let (mut farmer, _farm, mut n, node) = farm_with_node(&g, 4, 8).await;
    let farm2 = farmer.farm(&g, "second_farm").await;
    let mut user = Actor::new();
    user.twin(&g).await;
    user.ok(
        &g,
        Call::CreateNodeContract {
            node_id: node,
            deployment_hash: Hash([1; 32]),
            capacity: cap(1, 1),
        },
    )
    .await;
    let r = n.send(&g, Call::RegisterNode(spec(farm2, 4, 8))).await;
    assert_refused(r, 409, "conflict", "cannot move");
}

#[tokio::test]
async fn batch_keeps_order_and_reports_each_result() {
    let g = start_default().await;
    let mut a = Actor::new();
    let txs = vec![
        a.sign(Call::CreateTwin {
            relay: String::new(),
            enc_key: None,
        }),
        a.sign(Call::CreateFarm {
            name: "batchfarm".into(),
            dedicated: false,
        }),
        a.sign(Call::CreateFarm {
            name: "batchfarm".into(),
            dedicated: false,
        }),
        a.sign(Call::UpdateTwin {
            relay: "ws://after".into(),
            enc_key: None,
        }),
    ];
    let out = g.client.submit_batch(&txs).await.unwrap();
    use tfgrid_registry_client::BatchResult;
    assert!(
        matches!(&out[0], BatchResult::Ok(r) if r.outcome == Outcome::TwinCreated { twin_id: 1 })
    );
    assert!(
        matches!(&out[1], BatchResult::Ok(r) if r.outcome == Outcome::FarmCreated { farm_id: 1 })
    );
    assert!(matches!(&out[2], BatchResult::Err(e) if e.error == "conflict"));
    assert!(matches!(&out[3], BatchResult::Ok(_)));
    assert_eq!(g.client.twin(1).await.unwrap().relay, "ws://after");

    // The history alone rebuilds the same records (the refused transaction is not in it).
    let mut g = g;
    let kept = std::mem::replace(&mut g.dir, tempfile::tempdir().unwrap());
    drop(g);
    let store = loop {
        match tfgrid_registry::store::Store::open(kept.path()) {
            Ok(s) => break s,
            // Raft's tasks close the files once the server stopped.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    let loaded = store.load(RegistryConfig::default()).unwrap();
    let replayed = store.replay(RegistryConfig::default()).unwrap();
    assert_eq!(loaded.height, 3);
    assert_eq!(replayed.height, loaded.height);
    assert_eq!(json(&replayed.twins), json(&loaded.twins));
    assert_eq!(json(&replayed.farms), json(&loaded.farms));
    let nonces = |s: &tfgrid_registry::state::State| {
        let mut v: Vec<(String, u64)> = s.nonces.iter().map(|(k, n)| (k.to_hex(), *n)).collect();
        v.sort();
        v
    };
    assert_eq!(nonces(&replayed), nonces(&loaded));
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

#[tokio::test]
async fn search_over_http_filters_sorts_pages_and_counts() {
    let g = start_default().await;
    let mut farmer = Actor::new();
    farmer.twin(&g).await;
    let farm_a = farmer.farm(&g, "farm_a").await;
    let farm_b = farmer.farm(&g, "farm_b").await;
    for i in 0..12u64 {
        let mut n = Actor::new();
        n.twin(&g).await;
        let mut s = spec(if i % 3 == 0 { farm_b } else { farm_a }, 1 + i, 4 + i);
        if i % 4 == 0 {
            s.location.country = "Egypt".into();
        }
        if i == 5 {
            s.public_config.domain = Some("gw.grid.test".into());
        }
        n.ok(&g, Call::RegisterNode(s)).await;
    }
    let q = |f: NodeFilter| {
        let c = g.client.clone();
        async move { c.nodes(&f).await.unwrap() }
    };
    let p = q(NodeFilter {
        farm_ids: Some(vec![farm_b]),
        ret_count: true,
        ..Default::default()
    })
    .await;
    assert_eq!(p.count, Some(4));
    assert!(p.nodes.iter().all(|n| n.node.farm_id == farm_b));
    let p = q(NodeFilter {
        free_cru: Some(6),
        country: Some("egypt".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        p.nodes.iter().map(|n| n.node.total.cru).collect::<Vec<_>>(),
        vec![9]
    );
    let p = q(NodeFilter {
        sort_by: Some(tfgrid_core::filter::SortBy::FreeMru),
        sort_order: Some(tfgrid_core::filter::SortOrder::Desc),
        size: Some(3),
        page: Some(2),
        ..Default::default()
    })
    .await;
    assert_eq!(
        p.nodes
            .iter()
            .map(|n| n.node.total.mru / GIB)
            .collect::<Vec<_>>(),
        vec![12, 11, 10]
    );
    let p = q(NodeFilter {
        domain: Some(true),
        ..Default::default()
    })
    .await;
    assert_eq!(p.nodes.len(), 1);
    assert_eq!(p.count, None);
    let p = q(NodeFilter {
        node_ids: Some(vec![2, 4, 400]),
        ..Default::default()
    })
    .await;
    assert_eq!(
        p.nodes.iter().map(|n| n.node.id).collect::<Vec<_>>(),
        vec![2, 4]
    );
}

#[tokio::test]
async fn each_node_gets_its_own_workload_prefix_until_the_range_is_full() {
    let g = start(RegistryConfig {
        workload_range: "10.200.0.0/22".parse().unwrap(),
        node_prefix_len: 24,
        network_range: "10.201.0.0/16".parse().unwrap(),
        network_prefix_len: 22,
        ..Default::default()
    })
    .await;
    let mut farmer = Actor::new();
    farmer.twin(&g).await;
    let farm = farmer.farm(&g, "prefixes").await;
    let mut prefixes = Vec::new();
    let mut nodes = Vec::new();
    for _ in 0..4 {
        let mut n = Actor::new();
        n.twin(&g).await;
        let r = n
            .send(&g, Call::RegisterNode(spec(farm, 2, 8)))
            .await
            .unwrap();
        let Outcome::NodeRegistered { node_id } = r.outcome else {
            panic!("{r:?}")
        };
        prefixes.push(
            g.client
                .node(node_id)
                .await
                .unwrap()
                .node
                .workload_prefix
                .to_string(),
        );
        nodes.push((n, node_id));
    }
    assert_eq!(
        prefixes,
        [
            "10.200.0.0/24",
            "10.200.1.0/24",
            "10.200.2.0/24",
            "10.200.3.0/24"
        ]
    );
    // Registering again (an update) keeps the prefix.
    let (n, id) = &mut nodes[1];
    n.send(&g, Call::RegisterNode(spec(farm, 4, 8)))
        .await
        .unwrap();
    assert_eq!(
        g.client
            .node(*id)
            .await
            .unwrap()
            .node
            .workload_prefix
            .to_string(),
        "10.200.1.0/24"
    );
    // The fifth has no room, and is told why; nothing is registered.
    let mut n = Actor::new();
    n.twin(&g).await;
    assert_refused(
        n.send(&g, Call::RegisterNode(spec(farm, 2, 8))).await,
        409,
        "conflict",
        "10.200.0.0/22 has room for 4 nodes",
    );
    assert_eq!(g.client.stats().await.unwrap().nodes, 4);
}

#[tokio::test]
async fn a_node_publishes_its_overlay_key_and_endpoints() {
    let g = start(RegistryConfig::default()).await;
    let mut farmer = Actor::new();
    farmer.twin(&g).await;
    let farm = farmer.farm(&g, "overlay").await;
    let mut n = Actor::new();
    n.twin(&g).await;
    let overlay = |endpoints: &[&str]| {
        Some(Overlay {
            wg_key: X25519Key([7; 32]),
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        })
    };
    let with = |o: Option<Overlay>| {
        let mut s = spec(farm, 2, 8);
        s.overlay = o;
        Call::RegisterNode(s)
    };
    for (bad, why) in [
        (
            overlay(&["0.0.0.0:51820"]),
            "overlay endpoint 0.0.0.0:51820",
        ),
        (overlay(&["198.18.0.2:0"]), "port not 0"),
        (overlay(&["224.0.0.1:51820"]), "multicast"),
        (overlay(&["198.18.0.2:51820"; 9]), "at most 8 endpoints"),
    ] {
        assert_refused(n.send(&g, with(bad)).await, 400, "malformed", why);
    }
    assert_eq!(g.client.stats().await.unwrap().nodes, 0);
    let r = n
        .send(
            &g,
            with(overlay(&["198.18.0.2:51820", "[2001:db8::2]:51820"])),
        )
        .await
        .unwrap();
    let Outcome::NodeRegistered { node_id } = r.outcome else {
        panic!("{r:?}")
    };
    let got = g.client.node(node_id).await.unwrap().node.overlay.unwrap();
    assert_eq!(got.wg_key, X25519Key([7; 32]));
    assert_eq!(got.endpoints.len(), 2);
    // A node that moves publishes its new endpoints by registering again.
    n.send(&g, with(overlay(&["198.18.0.9:4000"])))
        .await
        .unwrap();
    let got = g.client.node(node_id).await.unwrap().node.overlay.unwrap();
    assert_eq!(got.endpoints, ["198.18.0.9:4000".parse().unwrap()]);
}

#[tokio::test]
async fn whoami_answers_the_address_a_request_came_from() {
    let g = start(RegistryConfig::default()).await;
    assert_eq!(
        g.client.whoami().await.unwrap(),
        std::net::IpAddr::from([127, 0, 0, 1])
    );
}

#[tokio::test]
async fn a_network_range_that_overlaps_the_workload_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = RegistryConfig {
        workload_range: "10.200.0.0/16".parse().unwrap(),
        ..Default::default()
    };
    let e = tfgrid_registry::Registry::open(dir.path(), bad)
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("overlaps the workload range"), "{e}");
    let bad = RegistryConfig {
        network_prefix_len: 27,
        ..Default::default()
    };
    let e = tfgrid_registry::Registry::open(dir.path(), bad)
        .await
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("need range <= network < subnet"),
        "{e}"
    );
}

#[tokio::test]
async fn private_networks_are_the_owners_alone_and_addressed_by_position() {
    use tfgrid_core::network::{Layout, NetworkHost, Place};
    let g = start(RegistryConfig::default()).await;
    let l = Layout::of(&RegistryConfig::default());
    let mut farmer = Actor::new();
    farmer.twin(&g).await;
    let farm = farmer.farm(&g, "nets").await;
    // Two nodes on the overlay, one not.
    let mut nodes = Vec::new();
    for (i, on_overlay) in [(1u8, true), (2, true), (3, false)] {
        let mut n = Actor::new();
        n.twin(&g).await;
        let mut s = spec(farm, 2, 8);
        if on_overlay {
            s.overlay = Some(Overlay {
                wg_key: X25519Key([i; 32]),
                endpoints: vec![format!("198.18.0.{i}:51820").parse().unwrap()],
            });
        }
        let Outcome::NodeRegistered { node_id } = n.ok(&g, Call::RegisterNode(s)).await else {
            panic!()
        };
        nodes.push(node_id);
    }
    let mut alice = Actor::new();
    let alice_twin = alice.twin(&g).await;
    let mut bob = Actor::new();
    bob.twin(&g).await;
    let create = |name: &str| Call::CreateNetwork { name: name.into() };
    let Outcome::NetworkCreated { network_id: a } = alice.ok(&g, create("shop")).await else {
        panic!()
    };
    // Names are per twin: bob may have a "shop" too, alice not a second one.
    assert_refused(
        alice.send(&g, create("shop")).await,
        409,
        "conflict",
        "already has",
    );
    let Outcome::NetworkCreated { network_id: b } = bob.ok(&g, create("shop")).await else {
        panic!()
    };
    assert_ne!(a, b);
    assert_refused(
        alice.send(&g, create("Bad_Name")).await,
        400,
        "malformed",
        "network name",
    );
    let add = |network_id, node_id| Call::AddNetworkNode {
        network_id,
        node_id,
    };
    // Only the owner changes a network; only overlay nodes join; unknown ones are not found.
    assert_refused(
        bob.send(&g, add(a, nodes[0])).await,
        403,
        "forbidden",
        "belongs to twin",
    );
    assert_refused(
        alice.send(&g, add(a, nodes[2])).await,
        409,
        "conflict",
        "not on the grid overlay",
    );
    assert_refused(
        alice.send(&g, add(a, 99)).await,
        404,
        "not_found",
        "node 99",
    );
    assert_refused(
        alice.send(&g, add(77, nodes[0])).await,
        404,
        "not_found",
        "network 77",
    );
    alice.ok(&g, add(a, nodes[1])).await;
    alice.ok(&g, add(a, nodes[0])).await;
    alice.ok(&g, add(a, nodes[1])).await; // again: nothing changes
    bob.ok(&g, add(b, nodes[0])).await;
    let na = g.client.network(a).await.unwrap();
    assert_eq!(na.twin_id, alice_twin);
    assert_eq!(na.nodes, vec![nodes[1], nodes[0]]);
    assert_eq!(Some(na.range), l.network_range(a));
    // Subnets follow positions, so any node finds the holder of an address from the record.
    let s1 = na.subnet_of(&l, nodes[1]).unwrap();
    let inside = std::net::Ipv4Addr::from(u32::from(s1.addr()) + 5);
    assert_eq!(
        l.place(inside),
        Some(Place::Node {
            network: a,
            index: 0
        })
    );
    let nb = g.client.network(b).await.unwrap();
    assert!(!nb.range.overlaps(&na.range));
    assert_eq!(
        g.client.networks_on(nodes[0]).await.unwrap().len(),
        2,
        "node 1 serves both networks"
    );
    assert!(g.client.networks_on(nodes[2]).await.unwrap().is_empty());
    assert_eq!(
        g.client
            .network_by_name(alice_twin, "shop")
            .await
            .unwrap()
            .map(|n| n.id),
        Some(a)
    );
    // A user's machine joins with its own key; a node's key is refused; the same key again
    // keeps its address and moves to the node given.
    let access = |key: [u8; 32], node_id| Call::AddNetworkAccess {
        network_id: a,
        wg_key: X25519Key(key),
        node_id,
    };
    assert_refused(
        alice.send(&g, access([1; 32], nodes[0])).await,
        409,
        "conflict",
        "node's overlay key",
    );
    assert_refused(
        bob.send(&g, access([40; 32], nodes[0])).await,
        403,
        "forbidden",
        "belongs to twin",
    );
    alice.ok(&g, access([40; 32], nodes[0])).await;
    alice.ok(&g, access([41; 32], nodes[0])).await;
    alice.ok(&g, access([40; 32], nodes[1])).await;
    let na = g.client.network(a).await.unwrap();
    assert_eq!(na.access.len(), 2);
    assert_eq!(na.access[0].node_id, nodes[1]);
    assert_eq!(
        l.place(l.access_addr(a, 1).unwrap()),
        Some(Place::Access {
            network: a,
            index: 1
        })
    );
    // Service names: inside the network's range only, each name once.
    let host = |name: &str, ip: std::net::Ipv4Addr| NetworkHost {
        name: name.into(),
        addrs: vec![ip],
    };
    let hosts = |h: Vec<NetworkHost>| Call::SetNetworkHosts {
        network_id: a,
        hosts: h,
    };
    assert_refused(
        alice
            .send(&g, hosts(vec![host("web", [10, 64, 0, 2].into())]))
            .await,
        400,
        "malformed",
        "not in the network's range",
    );
    assert_refused(
        alice
            .send(&g, hosts(vec![host("web", inside), host("web", inside)]))
            .await,
        400,
        "malformed",
        "given twice",
    );
    assert_refused(
        alice.send(&g, hosts(vec![host("Web!", inside)])).await,
        400,
        "malformed",
        "host name",
    );
    assert_refused(
        bob.send(&g, hosts(vec![])).await,
        403,
        "forbidden",
        "belongs to twin",
    );
    alice.ok(&g, hosts(vec![host("web", inside)])).await;
    assert_eq!(
        g.client.network(a).await.unwrap().hosts,
        vec![host("web", inside)]
    );
    // Kept across a restart of the registry (its store).
    let mut g = g;
    let kept = std::mem::replace(&mut g.dir, tempfile::tempdir().unwrap());
    let dir = kept.path().to_path_buf();
    drop(g);
    sleep_ms(200).await;
    let r = tfgrid_registry::Registry::open(&dir, RegistryConfig::default())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(r.serve(listener, std::future::pending::<()>()));
    let c = tfgrid_registry_client::RegistryClient::new(&url);
    let again = c.network(a).await.unwrap();
    assert_eq!(again.hosts, vec![host("web", inside)]);
    assert_eq!(again.nodes, vec![nodes[1], nodes[0]]);
    assert_eq!(
        c.network_by_name(alice_twin, "shop")
            .await
            .unwrap()
            .map(|n| n.id),
        Some(a)
    );
}

#[tokio::test]
async fn a_client_given_several_registry_urls_goes_on_to_the_next_one() {
    let g = start_default().await;
    // A port nothing listens on: connections to it are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let c = tfgrid_registry_client::RegistryClient::new(&format!("{dead}, {}/", g.url));
    assert_eq!(c.base_urls(), [dead.clone(), g.url.clone()]);
    assert_eq!(c.base_url(), dead);
    // A read and a write both reach the live one; it is tried first from then on.
    c.health().await.unwrap();
    assert_eq!(c.base_url(), g.url);
    let signer = tfgrid_registry_client::TwinSigner::new(Identity::generate(), c.clone());
    signer.ensure_twin("").await.unwrap();
    let c2 = tfgrid_registry_client::RegistryClient::new(&format!("{dead},{}", g.url));
    let signer = tfgrid_registry_client::TwinSigner::new(Identity::generate(), c2.clone());
    let t = signer.ensure_twin("").await.unwrap();
    assert_eq!(g.client.twin(t).await.unwrap().id, t);
    assert_eq!(c2.base_url(), g.url);
    // None answering: the error names the last one tried.
    let none = tfgrid_registry_client::RegistryClient::new(&format!("{dead},{dead}"));
    match none.stats().await {
        Err(tfgrid_registry_client::ClientError::Transport { url, .. }) => {
            assert!(url.starts_with(&dead), "{url}")
        }
        other => panic!("{other:?}"),
    }
}
