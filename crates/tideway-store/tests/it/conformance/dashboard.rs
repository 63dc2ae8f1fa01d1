//! Dashboard users, sessions and failed sign-ins (`DashboardStore`).

use std::sync::Arc;

use tideway_core::clock::Millis;
use tideway_core::dashboard::{PasswordHash, Role, Username};
use tideway_core::keys::Secret;
use tideway_core::store::prelude::*;
use tideway_core::store::{NewSession, StoreError};

use super::NOW;

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

fn hash(password: &str, salt: u8) -> PasswordHash {
    PasswordHash::new(password, [salt; 16]).unwrap()
}

pub(super) async fn users_are_created_listed_and_their_passwords_reset(store: Arc<dyn Store>) {
    let admin = store
        .create_dashboard_user(&name("admin"), Role::Admin, &hash("first password", 1), NOW)
        .await
        .unwrap();
    assert_eq!(admin.username, name("admin"));
    assert_eq!(admin.role, Role::Admin);
    let err = store
        .create_dashboard_user(
            &name("admin"),
            Role::ReadOnly,
            &hash("other password", 2),
            NOW,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    store
        .create_dashboard_user(
            &name("viewer"),
            Role::ReadOnly,
            &hash("viewer password", 3),
            NOW,
        )
        .await
        .unwrap();
    let users = store.list_dashboard_users().await.unwrap();
    let listed: Vec<_> = users
        .iter()
        .map(|u| (u.username.as_str(), u.role))
        .collect();
    assert_eq!(listed, [("admin", Role::Admin), ("viewer", Role::ReadOnly)]);
    let found = store.dashboard_user(&name("admin")).await.unwrap().unwrap();
    assert_eq!(found, admin);
    assert!(found.password_hash.verify("first password"));
    assert!(
        store
            .dashboard_user(&name("nobody"))
            .await
            .unwrap()
            .is_none()
    );

    assert!(
        store
            .set_dashboard_password(&name("admin"), &hash("second password", 4))
            .await
            .unwrap()
    );
    let found = store.dashboard_user(&name("admin")).await.unwrap().unwrap();
    assert!(found.password_hash.verify("second password"));
    assert!(!found.password_hash.verify("first password"));
    assert!(
        !store
            .set_dashboard_password(&name("nobody"), &hash("second password", 4))
            .await
            .unwrap()
    );
}

pub(super) async fn sessions_expire_and_end_with_a_password_reset(store: Arc<dyn Store>) {
    let user = store
        .create_dashboard_user(&name("ops"), Role::ReadOnly, &hash("ops password!", 1), NOW)
        .await
        .unwrap();
    let token = Secret::new("session-token-1".into());
    let session = |token: &Secret, at: Millis| NewSession {
        token_hash: token.hash(),
        user_id: user.id,
        csrf: Secret::new(format!("csrf-{}", token.expose())),
        created_at: at,
        expires_at: Millis(at.0 + 1_000),
    };
    store
        .create_dashboard_session(session(&token, NOW))
        .await
        .unwrap();
    let live = store
        .dashboard_session(token.hash(), Millis(NOW.0 + 999))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(live.user.username, name("ops"));
    assert_eq!(live.user.role, Role::ReadOnly);
    assert_eq!(live.csrf.expose(), "csrf-session-token-1");
    assert_eq!(live.expires_at, Millis(NOW.0 + 1_000));
    assert!(
        store
            .dashboard_session(token.hash(), Millis(NOW.0 + 1_000))
            .await
            .unwrap()
            .is_none(),
        "expired"
    );
    let other = Secret::new("session-token-2".into());
    assert!(
        store
            .dashboard_session(other.hash(), NOW)
            .await
            .unwrap()
            .is_none()
    );

    // A sign-out deletes one session; a password reset ends every session of the user.
    store
        .create_dashboard_session(session(&other, NOW))
        .await
        .unwrap();
    store.delete_dashboard_session(other.hash()).await.unwrap();
    assert!(
        store
            .dashboard_session(other.hash(), NOW)
            .await
            .unwrap()
            .is_none()
    );
    let third = Secret::new("session-token-3".into());
    store
        .create_dashboard_session(session(&third, NOW))
        .await
        .unwrap();
    store
        .set_dashboard_password(&name("ops"), &hash("new ops password", 2))
        .await
        .unwrap();
    assert!(
        store
            .dashboard_session(third.hash(), NOW)
            .await
            .unwrap()
            .is_none()
    );
}

/// Failures recorded for one key at once are counted one after another: the counts returned
/// are 1, 2, … n in some order, so a lockout that counts before it checks a password holds
/// under concurrent attempts.
pub(super) async fn concurrent_sign_in_failures_are_each_counted_once(store: Arc<dyn Store>) {
    let key = "admin|127.0.0.2";
    let attempts: Vec<_> = (0..16)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .record_sign_in_failure(key, Millis(NOW.0 + i), Millis(0))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut counts = Vec::new();
    for attempt in attempts {
        counts.push(attempt.await.unwrap());
    }
    counts.sort_unstable();
    assert_eq!(counts, (1..=16).collect::<Vec<u32>>());
}

pub(super) async fn sign_in_failures_are_counted_per_key_within_the_window(store: Arc<dyn Store>) {
    let key = "admin|127.0.0.1";
    assert_eq!(store.sign_in_failures(key, Millis(0)).await.unwrap(), 0);
    for i in 0..3 {
        let n = store
            .record_sign_in_failure(key, Millis(NOW.0 + i), Millis(0))
            .await
            .unwrap();
        assert_eq!(n, u32::try_from(i + 1).unwrap());
    }
    store
        .record_sign_in_failure("admin|10.0.0.1", NOW, Millis(0))
        .await
        .unwrap();
    assert_eq!(store.sign_in_failures(key, Millis(0)).await.unwrap(), 3);
    assert_eq!(
        store
            .sign_in_failures(key, Millis(NOW.0 + 1))
            .await
            .unwrap(),
        2
    );
    // A failure later than the window forgets the old ones.
    let n = store
        .record_sign_in_failure(key, Millis(NOW.0 + 10_000), Millis(NOW.0 + 5_000))
        .await
        .unwrap();
    assert_eq!(n, 1);
    store.clear_sign_in_failures(key).await.unwrap();
    assert_eq!(store.sign_in_failures(key, Millis(0)).await.unwrap(), 0);
    assert_eq!(
        store
            .sign_in_failures("admin|10.0.0.1", Millis(0))
            .await
            .unwrap(),
        1
    );
}
