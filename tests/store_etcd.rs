//! The ownership store's reads against a real etcd: the confirmation read that every node
//! runs every few milliseconds fetches only what changed since its last read, and must
//! still equal a full read after every kind of change (new, rewritten, deleted and
//! unreadable records, signs of life, keys of others under the prefix).

use std::net::IpAddr;

use havip_tests::cluster::ClusterLab;
use havip_user::{
    cluster::{
        record::{self, NodeMark, VipRecord},
        store::{ReadCache, ReadKind, Snapshot, Store},
    },
    kernel::netns::in_netns,
};

fn rec(owner: &str, reason: &str) -> Vec<u8> {
    let r = VipRecord { owner: owner.into(), candidates: vec!["n1".into(), "n2".into()], handover: false, from: None, reason: reason.into(), at_unix_ms: 1 };
    serde_json::to_vec(&r).unwrap()
}

fn vip(i: u8) -> IpAddr {
    format!("198.18.130.{i}").parse().unwrap()
}

#[test]
fn the_incremental_confirmation_read_equals_a_full_read_through_every_kind_of_change() {
    let lab = ClusterLab::new(1, 1);
    let (endpoints, prefix) = (lab.etcd_endpoints(), lab.key_prefix());
    in_netns(&lab.node_ns(1).name.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut kv = etcd_client::Client::connect(&endpoints, None).await.expect("etcd answers");
            let mut store = Store::with_client(kv.clone(), &prefix, endpoints.clone());
            let mut cache = ReadCache::default();
            // Each step: the change, then the cached read must equal a fresh full read and
            // be answered the way named.
            let check = async |store: &mut Store, cache: &mut ReadCache, want: ReadKind, step: &str| -> Snapshot {
                let (got, kind) = store.read_counted(cache).await.expect("cached read");
                let (full, full_kind) = store.read_counted(&mut ReadCache::default()).await.expect("full read");
                assert_eq!(full_kind, ReadKind::Full);
                assert_eq!(got, full, "{step}: the cached read differs from a full read");
                assert_eq!(kind, want, "{step}: read the wrong way");
                got
            };
            for i in 1..=3 {
                kv.put(record::key(&prefix, vip(i)), rec("n1", "initial"), None).await.unwrap();
            }
            let mark = NodeMark { node: "n2".into(), incarnation: 1, every_ms: 20, count: 1 };
            kv.put(record::node_key(&prefix, "n2"), serde_json::to_vec(&mark).unwrap(), None).await.unwrap();
            kv.put(format!("{prefix}/manager-state"), "not a record", None).await.unwrap();
            let first = check(&mut store, &mut cache, ReadKind::Full, "first read").await;
            assert_eq!(first.records.len(), 3);
            assert_eq!(first.marks.len(), 1);

            let same = check(&mut store, &mut cache, ReadKind::Changes, "nothing changed").await;
            assert_eq!(same.records, first.records);

            kv.put(record::key(&prefix, vip(2)), rec("n2", "owner-silent"), None).await.unwrap();
            kv.put(record::key(&prefix, vip(4)), rec("n2", "initial"), None).await.unwrap();
            let mark = NodeMark { count: 2, ..mark };
            kv.put(record::node_key(&prefix, "n2"), serde_json::to_vec(&mark).unwrap(), None).await.unwrap();
            let changed = check(&mut store, &mut cache, ReadKind::Changes, "one rewritten, one new, a mark rewritten").await;
            assert_eq!(changed.records[&vip(2)].0.owner, "n2");
            assert_eq!(changed.records.len(), 4);
            assert!(changed.marks["n2"].0 > first.marks["n2"].0, "the mark's new revision is not seen");

            kv.delete(record::key(&prefix, vip(1)), None).await.unwrap();
            let deleted = check(&mut store, &mut cache, ReadKind::Full, "one deleted").await;
            assert!(!deleted.records.contains_key(&vip(1)));

            // A deletion hidden behind a creation keeps the count: both show.
            kv.delete(record::key(&prefix, vip(3)), None).await.unwrap();
            kv.put(record::key(&prefix, vip(5)), rec("n1", "initial"), None).await.unwrap();
            check(&mut store, &mut cache, ReadKind::Full, "one deleted, one new").await;

            kv.put(record::key(&prefix, vip(4)), "{not json", None).await.unwrap();
            let garbage = check(&mut store, &mut cache, ReadKind::Changes, "a record made unreadable").await;
            assert!(!garbage.records.contains_key(&vip(4)), "an unreadable record stayed as it was");
        });
    })
    .unwrap();
}
