//! The conformance suite every [`Store`](super::Store) backend runs.

/// Expands to a module of `#[tokio::test]`s exercising a [`Store`](crate::store::Store).
///
/// `$make` is an expression (evaluated inside an async test) that yields a fresh, empty store.
///
/// ```ignore
/// trestle::store_conformance_tests!(MyStore::connect_test_db().await.unwrap());
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        mod store_conformance {
            #[allow(unused_imports)]
            use super::*;
            use $crate::store::{DeadLetter, Ghost, MessageMapping, Portal, Store, UserSettings};

            #[tokio::test]
            async fn transactions_dedupe_progress_and_prune() {
                let s = $make;
                let body = bytes::Bytes::from_static(br#"{"events":[]}"#);
                assert!(s.insert_transaction("a", body.clone()).await.unwrap());
                assert!(!s.insert_transaction("a", body.clone()).await.unwrap());
                assert!(s.insert_transaction("b", body.clone()).await.unwrap());
                let p = s.pending_transactions().await.unwrap();
                assert_eq!(p.iter().map(|t| t.txn_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
                assert_eq!(p[0].body, body);
                s.mark_done(&[("a".to_owned(), 0), ("a".to_owned(), 2), ("a".to_owned(), 2)])
                    .await
                    .unwrap();
                let p = s.pending_transactions().await.unwrap();
                let mut done = p[0].done.clone();
                done.sort_unstable();
                assert_eq!(done, [0, 2]);
                s.complete_transaction("a").await.unwrap();
                let p = s.pending_transactions().await.unwrap();
                assert_eq!(p.len(), 1);
                assert_eq!(p[0].txn_id, "b");
                // Completed ids still dedupe.
                assert!(!s.insert_transaction("a", body.clone()).await.unwrap());
                // Pruning keeps the newest `keep` ids and never pending ones.
                s.complete_transaction("b").await.unwrap();
                let removed = s.prune_transactions(i64::MAX, 1).await.unwrap();
                assert_eq!(removed, 1);
                assert!(s.insert_transaction("a", body.clone()).await.unwrap());
                assert!(!s.insert_transaction("b", body).await.unwrap());
            }

            #[tokio::test]
            async fn dead_letters_round_trip() {
                let s = $make;
                let l = DeadLetter {
                    txn_id: "t".into(),
                    idx: 3,
                    lane: "!r:x".into(),
                    event_id: Some("$e".into()),
                    event_type: "m.room.message".into(),
                    payload: "{}".into(),
                    error: "boom".into(),
                    attempts: 5,
                    failed_at: 42,
                };
                s.add_dead_letter(&l).await.unwrap();
                assert_eq!(s.dead_letters(10).await.unwrap(), vec![l]);
            }

            #[tokio::test]
            async fn portals_and_ghosts() {
                let s = $make;
                let p = Portal {
                    remote_id: "net/#chan".into(),
                    room_id: "!r:x".into(),
                    alias: Some("#a:x".into()),
                    metadata: serde_json::json!({"k": 1}),
                    created_at: 7,
                };
                s.upsert_portal(&p).await.unwrap();
                assert_eq!(s.portal_by_remote("net/#chan").await.unwrap(), Some(p.clone()));
                assert_eq!(s.portal_by_room("!r:x").await.unwrap(), Some(p.clone()));
                assert_eq!(s.portals().await.unwrap(), vec![p]);
                s.delete_portal("net/#chan").await.unwrap();
                assert_eq!(s.portal_by_room("!r:x").await.unwrap(), None);

                let g = Ghost {
                    remote_id: "net/alice".into(),
                    user_id: "@x_alice:x".into(),
                    displayname: Some("Alice".into()),
                    avatar_url: None,
                    metadata: serde_json::json!({}),
                };
                s.upsert_ghost(&g).await.unwrap();
                assert_eq!(s.ghost_by_remote("net/alice").await.unwrap(), Some(g.clone()));
                assert_eq!(s.ghost_by_user("@x_alice:x").await.unwrap(), Some(g));
                assert_eq!(s.ghost_by_user("@nobody:x").await.unwrap(), None);
            }

            #[tokio::test]
            async fn user_settings_messages_kv_and_caches() {
                let s = $make;
                let us = UserSettings {
                    user_id: "@u:x".into(),
                    network: "net".into(),
                    settings: serde_json::json!({"nick": "u"}),
                    secret: Some(vec![1, 2, 3]),
                };
                s.set_user_settings(&us).await.unwrap();
                assert_eq!(s.user_settings("@u:x", "net").await.unwrap(), Some(us.clone()));
                assert_eq!(s.users_with_settings("net").await.unwrap(), vec![us]);
                s.delete_user_settings("@u:x", "net").await.unwrap();
                assert_eq!(s.user_settings("@u:x", "net").await.unwrap(), None);

                let m = |room: &str, part| MessageMapping {
                    room_id: room.into(),
                    remote_id: "m1".into(),
                    part,
                    event_id: format!("$e{part}{room}"),
                    sender: "@u:x".into(),
                    timestamp: 1,
                };
                s.insert_message(&m("!a:x", 1)).await.unwrap();
                s.insert_message(&m("!a:x", 0)).await.unwrap();
                s.insert_message(&m("!b:x", 0)).await.unwrap();
                assert_eq!(
                    s.messages_by_remote("!a:x", "m1").await.unwrap(),
                    vec![m("!a:x", 0), m("!a:x", 1)]
                );
                // Mappings are scoped per room.
                assert_eq!(s.message_by_event("!b:x", "$e0!a:x").await.unwrap(), None);
                assert_eq!(
                    s.message_by_event("!a:x", "$e0!a:x").await.unwrap(),
                    Some(m("!a:x", 0))
                );
                // One event sent as two remote messages: both found from the event, in order.
                let split = |remote: &str, part| MessageMapping {
                    room_id: "!a:x".into(),
                    remote_id: remote.into(),
                    part,
                    event_id: "$long".into(),
                    sender: "@u:x".into(),
                    timestamp: 2,
                };
                s.insert_message(&split("m3", 1)).await.unwrap();
                s.insert_message(&split("m2", 0)).await.unwrap();
                assert_eq!(
                    s.messages_by_event("!a:x", "$long").await.unwrap(),
                    vec![split("m2", 0), split("m3", 1)]
                );
                assert!(s.messages_by_event("!b:x", "$long").await.unwrap().is_empty());
                s.delete_messages("!a:x", "m1").await.unwrap();
                assert!(s.messages_by_remote("!a:x", "m1").await.unwrap().is_empty());
                assert_eq!(s.messages_by_remote("!b:x", "m1").await.unwrap().len(), 1);

                assert_eq!(s.kv_get("k").await.unwrap(), None);
                s.kv_set("k", "v").await.unwrap();
                s.kv_set("k", "w").await.unwrap();
                assert_eq!(s.kv_get("k").await.unwrap().as_deref(), Some("w"));
                s.kv_delete("k").await.unwrap();
                assert_eq!(s.kv_get("k").await.unwrap(), None);

                assert!(!s.is_registered("@g:x").await.unwrap());
                s.mark_registered("@g:x").await.unwrap();
                s.mark_registered("@g:x").await.unwrap();
                assert!(s.is_registered("@g:x").await.unwrap());
                s.set_membership("!r:x", "@g:x", "invite").await.unwrap();
                s.set_membership("!r:x", "@g:x", "join").await.unwrap();
                s.set_membership("!r:x", "@h:x", "leave").await.unwrap();
                assert_eq!(s.membership("!r:x", "@g:x").await.unwrap().as_deref(), Some("join"));
                assert_eq!(s.members("!r:x", "join").await.unwrap(), vec!["@g:x".to_owned()]);
                let pl = serde_json::json!({"users": {"@g:x": 50}});
                s.set_power_levels("!r:x", &pl).await.unwrap();
                assert_eq!(s.power_levels("!r:x").await.unwrap(), Some(pl));
            }
        }
    };
}
