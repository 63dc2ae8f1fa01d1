//! REST API keys: secrets, their hashes, permissions and IP allowlists.
//!
//! A key is shown once at creation and stored only as its SHA-256 hash: keys are long random
//! strings, so a fast hash is enough (no password stretching needed), and lookups go by hash.
//! The final comparison is constant-time so response timing tells nothing about near-misses.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids::WorkspaceId;

/// Every permission a REST key can carry. Each names the endpoint (or endpoint family) it opens,
/// spelled as Braze spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    UsersTrack,
    UsersIdentify,
    UsersAliasNew,
    UsersAliasUpdate,
    UsersDelete,
    UsersExportIds,
    UsersMerge,
    UsersExternalIdsRename,
    UsersExternalIdsRemove,
    CohortsRead,
    SegmentsList,
    SegmentsDetails,
    SegmentsRead,
    SegmentsManage,
    CurrentsManage,
    CampaignsManage,
    CampaignsRead,
    CampaignsList,
    CampaignsDetails,
    CampaignsTriggerSend,
    CampaignsTriggerScheduleCreate,
    CampaignsTriggerScheduleUpdate,
    CampaignsTriggerScheduleDelete,
    MessagesSend,
    MessagesScheduleCreate,
    MessagesScheduleUpdate,
    MessagesScheduleDelete,
    MessagesScheduleBroadcasts,
    SendsIdCreate,
    SendsDataSeries,
    CanvasManage,
    CanvasRead,
    CanvasTriggerSend,
    CanvasList,
    CanvasDetails,
    CanvasTriggerScheduleCreate,
    CanvasTriggerScheduleUpdate,
    CanvasTriggerScheduleDelete,
}

impl Permission {
    pub const ALL: [Permission; 38] = [
        Permission::UsersTrack,
        Permission::UsersIdentify,
        Permission::UsersAliasNew,
        Permission::UsersAliasUpdate,
        Permission::UsersDelete,
        Permission::UsersExportIds,
        Permission::UsersMerge,
        Permission::UsersExternalIdsRename,
        Permission::UsersExternalIdsRemove,
        Permission::CohortsRead,
        Permission::SegmentsList,
        Permission::SegmentsDetails,
        Permission::SegmentsRead,
        Permission::SegmentsManage,
        Permission::CurrentsManage,
        Permission::CampaignsManage,
        Permission::CampaignsRead,
        Permission::CampaignsList,
        Permission::CampaignsDetails,
        Permission::CampaignsTriggerSend,
        Permission::CampaignsTriggerScheduleCreate,
        Permission::CampaignsTriggerScheduleUpdate,
        Permission::CampaignsTriggerScheduleDelete,
        Permission::MessagesSend,
        Permission::MessagesScheduleCreate,
        Permission::MessagesScheduleUpdate,
        Permission::MessagesScheduleDelete,
        Permission::MessagesScheduleBroadcasts,
        Permission::SendsIdCreate,
        Permission::SendsDataSeries,
        Permission::CanvasManage,
        Permission::CanvasRead,
        Permission::CanvasTriggerSend,
        Permission::CanvasList,
        Permission::CanvasDetails,
        Permission::CanvasTriggerScheduleCreate,
        Permission::CanvasTriggerScheduleUpdate,
        Permission::CanvasTriggerScheduleDelete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::UsersTrack => "users.track",
            Permission::UsersIdentify => "users.identify",
            Permission::UsersAliasNew => "users.alias.new",
            Permission::UsersAliasUpdate => "users.alias.update",
            Permission::UsersDelete => "users.delete",
            Permission::UsersExportIds => "users.export.ids",
            Permission::UsersMerge => "users.merge",
            Permission::UsersExternalIdsRename => "users.external_ids.rename",
            Permission::UsersExternalIdsRemove => "users.external_ids.remove",
            Permission::CohortsRead => "cohorts.read",
            Permission::SegmentsList => "segments.list",
            Permission::SegmentsDetails => "segments.details",
            Permission::SegmentsRead => "segments.read",
            Permission::SegmentsManage => "segments.manage",
            Permission::CurrentsManage => "currents.manage",
            Permission::CampaignsManage => "campaigns.manage",
            Permission::CampaignsRead => "campaigns.read",
            Permission::CampaignsList => "campaigns.list",
            Permission::CampaignsDetails => "campaigns.details",
            Permission::CampaignsTriggerSend => "campaigns.trigger.send",
            Permission::CampaignsTriggerScheduleCreate => "campaigns.trigger.schedule.create",
            Permission::CampaignsTriggerScheduleUpdate => "campaigns.trigger.schedule.update",
            Permission::CampaignsTriggerScheduleDelete => "campaigns.trigger.schedule.delete",
            Permission::MessagesSend => "messages.send",
            Permission::MessagesScheduleCreate => "messages.schedule.create",
            Permission::MessagesScheduleUpdate => "messages.schedule.update",
            Permission::MessagesScheduleDelete => "messages.schedule.delete",
            Permission::MessagesScheduleBroadcasts => "messages.schedule_broadcasts",
            Permission::SendsIdCreate => "sends.id.create",
            Permission::SendsDataSeries => "sends.data_series",
            Permission::CanvasManage => "canvas.manage",
            Permission::CanvasRead => "canvas.read",
            Permission::CanvasTriggerSend => "canvas.trigger.send",
            Permission::CanvasList => "canvas.list",
            Permission::CanvasDetails => "canvas.details",
            Permission::CanvasTriggerScheduleCreate => "canvas.trigger.schedule.create",
            Permission::CanvasTriggerScheduleUpdate => "canvas.trigger.schedule.update",
            Permission::CanvasTriggerScheduleDelete => "canvas.trigger.schedule.delete",
        }
    }
}

/// An unknown permission name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown permission '{0}' (known: {known})", known = Permission::ALL.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", "))]
pub struct UnknownPermission(pub String);

impl FromStr for Permission {
    type Err = UnknownPermission;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPermission(s.to_owned()))
    }
}

/// A set of permissions, written as a comma-separated list (`users.track,users.identify`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PermissionSet(BTreeSet<Permission>);

impl PermissionSet {
    pub fn all() -> Self {
        Self(Permission::ALL.into_iter().collect())
    }

    pub fn contains(&self, permission: Permission) -> bool {
        self.0.contains(&permission)
    }

    pub fn iter(&self) -> impl Iterator<Item = Permission> + '_ {
        self.0.iter().copied()
    }

    /// Parses `a,b,c`; blanks around names are ignored; an empty list is an error.
    pub fn parse_list(list: &str) -> Result<Self, UnknownPermission> {
        let set: BTreeSet<Permission> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Permission::from_str)
            .collect::<Result<_, _>>()?;
        if set.is_empty() {
            return Err(UnknownPermission(String::new()));
        }
        Ok(Self(set))
    }

    pub fn to_list(&self) -> String {
        self.iter()
            .map(Permission::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl FromIterator<Permission> for PermissionSet {
    fn from_iter<T: IntoIterator<Item = Permission>>(iter: T) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// A plaintext secret (REST key, data import key, token). Never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself: only for showing it once, or sending it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash(Sha256::digest(self.0.as_bytes()).into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

/// SHA-256 of a secret: what the store keeps.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Constant-time equality.
    pub fn matches(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({}…)", hex::encode(&self.0[..4]))
    }
}

/// Networks a key may be used from; empty = anywhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpAllowlist(Vec<ipnet::IpNet>);

/// A CIDR or address that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an IP address or CIDR network (e.g. 10.0.0.0/8 or 127.0.0.1)")]
pub struct BadCidr(pub String);

impl IpAllowlist {
    /// Parses one entry: a network (`10.0.0.0/8`) or a single address (`127.0.0.1`).
    pub fn parse_entry(raw: &str) -> Result<ipnet::IpNet, BadCidr> {
        let raw = raw.trim();
        if let Ok(net) = raw.parse::<ipnet::IpNet>() {
            return Ok(net);
        }
        raw.parse::<IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| BadCidr(raw.to_owned()))
    }

    pub fn parse_all<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, BadCidr> {
        entries
            .into_iter()
            .map(Self::parse_entry)
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn allows(&self, addr: IpAddr) -> bool {
        // An IPv4 client may arrive as an IPv4-mapped IPv6 address on a dual-stack socket.
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
            v4 => v4,
        };
        self.0.is_empty() || self.0.iter().any(|net| net.contains(&addr))
    }

    pub fn entries(&self) -> impl Iterator<Item = String> + '_ {
        self.0.iter().map(|n| n.to_string())
    }
}

/// A stored REST API key (without its secret).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: i64,
    pub workspace: WorkspaceId,
    pub name: String,
    /// The first characters of the secret, shown in listings so keys can be told apart.
    pub prefix: String,
    pub hash: KeyHash,
    pub permissions: PermissionSet,
    pub allow: IpAllowlist,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl ApiKey {
    /// How many leading characters of a secret are kept as its visible prefix.
    pub const PREFIX_LEN: usize = 8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_lists_round_trip() {
        let set = PermissionSet::parse_list("users.track, users.identify").unwrap();
        assert!(set.contains(Permission::UsersTrack));
        assert!(!set.contains(Permission::UsersDelete));
        assert_eq!(set.to_list(), "users.track,users.identify");
        assert!(PermissionSet::parse_list("users.trak").is_err());
        assert!(PermissionSet::parse_list("").is_err());
    }

    #[test]
    fn allowlist_matches_networks_and_mapped_v4() {
        let list = IpAllowlist::parse_all(["10.0.0.0/8", "127.0.0.1"]).unwrap();
        assert!(list.allows("10.1.2.3".parse().unwrap()));
        assert!(list.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!list.allows("192.168.0.1".parse().unwrap()));
        assert!(IpAllowlist::default().allows("8.8.8.8".parse().unwrap()));
        assert!(IpAllowlist::parse_entry("nope").is_err());
    }

    #[test]
    fn secrets_are_redacted_and_hash_compare_in_constant_time() {
        let s = Secret::new("abc".into());
        assert_eq!(format!("{s:?}"), "Secret([REDACTED])");
        assert!(s.hash().matches(&Secret::new("abc".into()).hash()));
        assert!(!s.hash().matches(&Secret::new("abd".into()).hash()));
    }
}
