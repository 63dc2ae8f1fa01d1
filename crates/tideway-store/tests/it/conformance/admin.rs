//! Workspaces, REST API keys and Heap webhook settings: what every request's authentication
//! reads (partner and data import keys are with the cohorts, whose import they guard).

use std::sync::Arc;

use tideway_core::clock::Millis;
use tideway_core::ids::{AliasLabel, WorkspaceId};
use tideway_core::keys::{ApiKey, IpAllowlist, Permission, PermissionSet, Secret};
use tideway_core::store::prelude::*;
use tideway_core::store::{HeapWebhook, NewApiKey, StoreError};

use super::NOW;

/// Workspace names are unique (surrounding blanks do not make a new one): a second one is a
/// `Conflict` and changes nothing; workspaces are found by name and listed oldest first; a fresh
/// store takes writes.
pub(super) async fn workspace_names_are_unique(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    assert_eq!((a.name.as_str(), a.created_at), ("a", NOW));
    let later = Millis(NOW.0 + 1);
    let b = store.create_workspace("b", later).await.unwrap();
    assert_ne!(a.id, b.id);
    assert_ne!(a.app_group_id, b.app_group_id);
    assert!(!a.app_group_id.is_empty());
    for name in ["a", "  a "] {
        let again = store.create_workspace(name, later).await;
        assert!(
            matches!(again, Err(StoreError::Conflict(_))),
            "{name:?}: {again:?}"
        );
    }
    assert_eq!(store.workspace_by_name("a").await.unwrap(), Some(a.clone()));
    assert_eq!(store.workspace_by_name("b").await.unwrap(), Some(b.clone()));
    assert_eq!(store.workspace_by_name("nope").await.unwrap(), None);
    assert_eq!(store.list_workspaces().await.unwrap(), vec![a, b]);
    assert!(
        store.accepts_writes().await.unwrap(),
        "a fresh store takes writes"
    );
}

fn new_key(workspace: WorkspaceId, name: &str, secret: &Secret) -> NewApiKey {
    NewApiKey {
        workspace,
        name: name.to_owned(),
        prefix: secret.expose().chars().take(ApiKey::PREFIX_LEN).collect(),
        hash: secret.hash(),
        permissions: [Permission::UsersTrack, Permission::UsersExportIds]
            .into_iter()
            .collect(),
        allow: IpAllowlist::parse_all(["10.0.0.0/8"]).unwrap(),
        created_at: NOW,
    }
}

/// A key as compared here: everything but its hash (compared through `find_api_key`).
fn shown(
    key: &ApiKey,
) -> (
    i64,
    WorkspaceId,
    String,
    String,
    PermissionSet,
    Vec<String>,
    i64,
    Option<i64>,
) {
    (
        key.id,
        key.workspace,
        key.name.clone(),
        key.prefix.clone(),
        key.permissions.clone(),
        key.allow.entries().collect(),
        key.created_at,
        key.revoked_at,
    )
}

/// REST API keys: created with their permissions and allowlist, listed per workspace, found by
/// the hash of their secret with their workspace, revoked by id or prefix (in their own
/// workspace only), and a revoked key is found no more.
pub(super) async fn api_keys_are_created_listed_revoked_and_found(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let k1 = Secret::new("key-one-1111".into());
    let k2 = Secret::new("key-two-2222".into());
    let k3 = Secret::new("key-bbb-3333".into());
    let one = store
        .create_api_key(new_key(a.id, "one", &k1))
        .await
        .unwrap();
    let two = store
        .create_api_key(new_key(a.id, "two", &k2))
        .await
        .unwrap();
    let three = store
        .create_api_key(new_key(b.id, "three", &k3))
        .await
        .unwrap();
    assert_eq!(
        shown(&one),
        (
            one.id,
            a.id,
            "one".into(),
            "key-one-".into(),
            [Permission::UsersTrack, Permission::UsersExportIds]
                .into_iter()
                .collect(),
            vec!["10.0.0.0/8".into()],
            NOW.0,
            None
        )
    );
    assert!(one.hash.matches(&k1.hash()));
    assert!(one.id != two.id && two.id != three.id);
    let listed: Vec<_> = store
        .list_api_keys(a.id)
        .await
        .unwrap()
        .iter()
        .map(shown)
        .collect();
    assert_eq!(listed, [shown(&one), shown(&two)]);
    let listed: Vec<_> = store
        .list_api_keys(b.id)
        .await
        .unwrap()
        .iter()
        .map(shown)
        .collect();
    assert_eq!(listed, [shown(&three)]);

    let (found, ws) = store
        .find_api_key(k2.hash())
        .await
        .unwrap()
        .expect("k2 is live");
    assert_eq!((shown(&found), ws), (shown(&two), a.clone()));
    let (_, ws) = store
        .find_api_key(k3.hash())
        .await
        .unwrap()
        .expect("k3 is live");
    assert_eq!(ws, b);
    assert!(
        store
            .find_api_key(Secret::new("key-one-1112".into()).hash())
            .await
            .unwrap()
            .is_none()
    );

    // Another workspace's key cannot be revoked, by id or prefix.
    let revoked_at = Millis(NOW.0 + 7);
    assert!(
        !store
            .revoke_api_key(b.id, &one.id.to_string(), revoked_at)
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_api_key(b.id, "key-one-", revoked_at)
            .await
            .unwrap()
    );
    assert!(store.find_api_key(k1.hash()).await.unwrap().is_some());
    // By id, then by prefix; a second revocation finds nothing to revoke.
    assert!(
        store
            .revoke_api_key(a.id, &one.id.to_string(), revoked_at)
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_api_key(a.id, &one.id.to_string(), revoked_at)
            .await
            .unwrap()
    );
    assert!(
        store
            .revoke_api_key(a.id, "key-two-", revoked_at)
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_api_key(a.id, "key-two-", revoked_at)
            .await
            .unwrap()
    );
    assert!(store.find_api_key(k1.hash()).await.unwrap().is_none());
    assert!(store.find_api_key(k2.hash()).await.unwrap().is_none());
    assert!(store.find_api_key(k3.hash()).await.unwrap().is_some());
    let listed: Vec<_> = store
        .list_api_keys(a.id)
        .await
        .unwrap()
        .iter()
        .map(|k| (k.name.clone(), k.revoked_at))
        .collect();
    assert_eq!(
        listed,
        [
            ("one".into(), Some(revoked_at.0)),
            ("two".into(), Some(revoked_at.0))
        ],
        "revoked keys are still listed"
    );
}

/// Heap webhook settings: the secret is created once per workspace from the first `fresh` one;
/// the alias label is replaced only when given; every workspace's settings are listed.
pub(super) async fn heap_webhook_settings_are_kept_per_workspace(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    assert_eq!(store.heap_webhooks().await.unwrap(), vec![]);
    let first = store
        .heap_webhook(a.id, Secret::new("whsec-a".into()), None)
        .await
        .unwrap();
    assert_eq!(
        first,
        HeapWebhook {
            workspace: a.clone(),
            secret: Secret::new("whsec-a".into()),
            alias_label: None,
        }
    );
    let label = AliasLabel::parse("heap_user_id").unwrap();
    let labelled = store
        .heap_webhook(
            a.id,
            Secret::new("whsec-other".into()),
            Some(Some(label.clone())),
        )
        .await
        .unwrap();
    assert_eq!(labelled.secret.expose(), "whsec-a", "the secret is kept");
    assert_eq!(labelled.alias_label, Some(label.clone()));
    let kept = store
        .heap_webhook(a.id, Secret::new("whsec-third".into()), None)
        .await
        .unwrap();
    assert_eq!(kept, labelled, "None leaves the label as it is");
    assert!(
        store.partner_enabled(a.id, "heap").await.unwrap(),
        "a webhook secret enables Heap"
    );
    assert!(!store.partner_enabled(b.id, "heap").await.unwrap());
    store
        .set_partner_enabled(b.id, "heap", false)
        .await
        .unwrap();
    let b_hook = store
        .heap_webhook(b.id, Secret::new("whsec-b".into()), None)
        .await
        .unwrap();
    assert_eq!(b_hook.workspace, b);
    assert!(
        !store.partner_enabled(b.id, "heap").await.unwrap(),
        "a disable made before the secret stays"
    );
    assert_eq!(
        store.heap_webhooks().await.unwrap(),
        vec![labelled.clone(), b_hook]
    );
    let cleared = store
        .heap_webhook(a.id, Secret::new("whsec-fourth".into()), Some(None))
        .await
        .unwrap();
    assert_eq!(
        cleared,
        HeapWebhook {
            alias_label: None,
            ..labelled
        }
    );
}
