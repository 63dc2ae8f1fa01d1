//! The user services: `/users/track`, identify, aliases, merge, delete, external-id renames and
//! export, written once against [`UserTx`] so every store runs the same rules.
//!
//! Each function runs inside one transaction the caller opened. Rules that are not obvious
//! (which identifier wins, when a user may be created, how profiles merge) come from
//! `reference/braze-api.md` §3, §4 and §7 and are cited where they are applied.

use serde_json::{Map, Value, json};

use crate::clock::{Millis, no_later_than};
use crate::currents::{CurrentsEvent, EventUser};
use crate::ids::{BrazeId, DeviceId, Email, ExternalId, IdSource, Phone, UserAlias};
use crate::message_events::{MessageSource, Origin};
use crate::profile::{CustomChange, Occurrences, StandardField, UserRecord, apply_custom};
use crate::store::{LockKey, Lookup, StoreError, UserLookup, UserTx, Workspace};
use crate::track::{
    AttributeObject, ContactChange, EventObject, InputArray, MAX_NESTED_BYTES, ObjectError,
    PurchaseObject, Target, TrackRequest, UserRef, json_len, not_valid,
};

/// `update_source` of profile updates made through the REST API.
pub const UPDATE_SOURCE_REST: &str = "rest_api";

/// What every write service needs besides the transaction.
pub struct WriteCtx<'a> {
    pub workspace: &'a Workspace,
    pub now: Millis,
    pub ids: &'a mut dyn IdSource,
    /// Longest array custom attribute (Braze default 25).
    pub max_array_len: usize,
}

impl WriteCtx<'_> {
    fn event_user<'u>(&self, user: &'u UserRecord, device: Option<&'u DeviceId>) -> EventUser<'u> {
        EventUser {
            braze_id: &user.braze_id,
            external_id: user.external_id.as_ref(),
            device_id: device,
            time_zone: user.time_zone(),
        }
    }
}

/// Result of `/users/track`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackOutcome {
    pub attributes_processed: usize,
    pub events_processed: usize,
    pub purchases_processed: usize,
    pub errors: Vec<ObjectError>,
}

/// How a target resolved.
enum Resolved {
    User(Box<UserRecord>),
    /// `_update_existing_only` and no such user: skipped, as Braze does, without an error.
    Skip,
    Error(String),
}

/// Users changed by one request, saved once at its end rather than once per object (a
/// request often touches the same user many times).
#[derive(Default)]
struct Touched(Vec<UserRecord>);

impl Touched {
    /// The freshest copy of `user`: this request's own if it changed it already.
    fn freshest(&mut self, user: UserRecord) -> UserRecord {
        match self.0.iter().position(|u| u.seq == user.seq) {
            Some(i) => self.0.swap_remove(i),
            None => user,
        }
    }

    fn keep(&mut self, user: UserRecord) {
        self.0.push(user);
    }

    /// This request's copy of the user with this external id, if it changed one.
    fn take_by_external(&mut self, ext: &ExternalId) -> Option<UserRecord> {
        let i = self
            .0
            .iter()
            .position(|u| u.external_id.as_ref() == Some(ext))?;
        Some(self.0.swap_remove(i))
    }

    fn flush(&mut self, tx: &mut dyn UserTx) -> Result<(), StoreError> {
        for user in self.0.drain(..) {
            tx.save_user(user)?;
        }
        Ok(())
    }
}

/// Every user a track request names, for one batched lookup ([`UserLookup::prefetch`]).
fn prefetch_keys(req: &TrackRequest) -> Vec<Lookup<'_>> {
    let targets = req
        .attributes
        .iter()
        .map(|(_, o)| &o.target)
        .chain(req.events.iter().map(|(_, o)| &o.target))
        .chain(req.purchases.iter().map(|(_, o)| &o.target));
    let mut keys = Vec::new();
    for t in targets {
        keys.push(match &t.primary {
            UserRef::External(e) => Lookup::External(e),
            UserRef::Alias(a) => Lookup::Alias(a),
            UserRef::Braze(b) => Lookup::Braze(b),
            UserRef::Email(e) => Lookup::Email(e),
            UserRef::Phone(p) => Lookup::Phone(p),
            UserRef::Device(d) => Lookup::Device(d),
        });
        if let Some(d) = &t.device {
            keys.push(Lookup::Device(d));
        }
        if let Some(a) = &t.alias {
            keys.push(Lookup::Alias(a));
        }
    }
    keys
}

/// Every user a track request names, as keys a store can lock before the request runs
/// ([`crate::store::UserStore::run_keyed_unit`]), each once; `None` if one is named by email
/// or phone (many users may share those, so no key stands for the user).
pub fn track_keys(req: &TrackRequest) -> Option<Vec<LockKey>> {
    let mut seen = std::collections::HashSet::new();
    let mut keys = Vec::new();
    for lookup in prefetch_keys(req) {
        let key = match lookup {
            Lookup::External(e) => LockKey::External(e.clone()),
            Lookup::Alias(a) => LockKey::Alias(a.clone()),
            Lookup::Braze(b) => LockKey::Braze(b.clone()),
            Lookup::Device(d) => LockKey::Device(d.clone()),
            Lookup::Email(_) | Lookup::Phone(_) => return None,
        };
        if !seen.contains(&key) {
            seen.insert(key.clone());
            keys.push(key);
        }
    }
    Some(keys)
}

/// Applies a parsed `/users/track` request: attributes, then events, then purchases (Braze's
/// processing order).
pub fn track(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    req: &TrackRequest,
) -> Result<TrackOutcome, StoreError> {
    let mut out = TrackOutcome {
        errors: req.errors.clone(),
        ..TrackOutcome::default()
    };
    tx.prefetch(&prefetch_keys(req))?;
    let mut touched = Touched::default();
    out.attributes_processed = apply_each(
        tx,
        ctx,
        &mut touched,
        &mut out.errors,
        InputArray::Attributes,
        &req.attributes,
        |o| &o.target,
        apply_attributes,
    )?;
    out.events_processed = apply_each(
        tx,
        ctx,
        &mut touched,
        &mut out.errors,
        InputArray::Events,
        &req.events,
        |o| &o.target,
        apply_event,
    )?;
    out.purchases_processed = apply_each(
        tx,
        ctx,
        &mut touched,
        &mut out.errors,
        InputArray::Purchases,
        &req.purchases,
        |o| &o.target,
        apply_purchase,
    )?;
    touched.flush(tx)?;
    out.errors.sort_by_key(|e| (e.input_array as u8, e.index));
    Ok(out)
}

/// The applier of one kind of track object: `Some(message)` if it refused the object as a
/// whole (nothing of it applied; reported in the response's `errors`).
type Apply<T> = fn(
    &mut dyn UserTx,
    &mut WriteCtx<'_>,
    &mut UserRecord,
    &T,
) -> Result<Option<String>, StoreError>;

/// Resolves and applies each object of one array; returns how many were processed and records
/// the ones whose user could not be resolved.
#[allow(clippy::too_many_arguments)]
fn apply_each<T>(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    touched: &mut Touched,
    errors: &mut Vec<ObjectError>,
    input_array: InputArray,
    objects: &[(usize, T)],
    target_of: fn(&T) -> &Target,
    apply: Apply<T>,
) -> Result<usize, StoreError> {
    let mut processed = 0;
    for (index, obj) in objects {
        match resolve_for_track(tx, ctx, target_of(obj), touched)? {
            Resolved::User(user) => {
                let mut user = touched.freshest(*user);
                let refused = apply(tx, ctx, &mut user, obj)?;
                touched.keep(user);
                match refused {
                    None => processed += 1,
                    Some(message) => errors.push(ObjectError {
                        input_array,
                        index: *index,
                        message,
                    }),
                }
            }
            Resolved::Skip => {}
            Resolved::Error(message) => errors.push(ObjectError {
                input_array,
                index: *index,
                message,
            }),
        }
    }
    Ok(processed)
}

/// [`resolve`], after saving this request's pending changes when the target may identify or
/// merge users (those paths read and write users directly in the store) or is found by email
/// or phone (a search of the stored columns, which must see an address set earlier in the
/// request, and not one changed away).
fn resolve_for_track(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    target: &Target,
    touched: &mut Touched,
) -> Result<Resolved, StoreError> {
    let by_contact = matches!(target.primary, UserRef::Email(_) | UserRef::Phone(_));
    if target.device.is_some() || target.alias.is_some() || by_contact {
        touched.flush(tx)?;
    } else if let UserRef::External(ext) = &target.primary
        && let Some(user) = touched.take_by_external(ext)
    {
        // A user this request already changed: its copy is the freshest, and looking the
        // user up again would only be thrown away.
        return Ok(Resolved::User(Box::new(user)));
    }
    resolve(tx, ctx, target)
}

fn new_user(tx: &mut dyn UserTx, ctx: &mut WriteCtx<'_>) -> Result<UserRecord, StoreError> {
    let braze_id = ctx.ids.braze_id();
    tx.create_user(braze_id, ctx.now)
}

/// The user an email (or phone) names for writes: the most recently updated profile with an
/// external id, else the most recently updated one (braze-api.md §3.8).
fn pick_contact_user(users: Vec<UserRecord>) -> Option<UserRecord> {
    let identified = users.iter().position(UserRecord::is_identified);
    match identified {
        Some(i) => users.into_iter().nth(i),
        None => users.into_iter().next(),
    }
}

fn resolve(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    target: &Target,
) -> Result<Resolved, StoreError> {
    let create = !target.update_existing_only;
    let user = match &target.primary {
        UserRef::External(ext) => return resolve_external(tx, ctx, ext, target),
        UserRef::Alias(alias) => match tx.user_by_alias(alias)? {
            Some(u) => u,
            None if create => {
                let u = new_user(tx, ctx)?;
                tx.put_alias(u.seq, alias)?;
                u
            }
            None => return Ok(Resolved::Skip),
        },
        UserRef::Braze(id) => match tx.user_by_braze_id(id)? {
            Some(u) => u,
            None => {
                return Ok(Resolved::Error(
                    "'braze_id' does not match an existing user".to_owned(),
                ));
            }
        },
        UserRef::Email(email) => match pick_contact_user(tx.users_by_email(email)?) {
            Some(u) => u,
            None if create => {
                let mut u = new_user(tx, ctx)?;
                u.email = Some(email.clone());
                tx.save_user(u.clone())?;
                u
            }
            None => return Ok(Resolved::Skip),
        },
        UserRef::Phone(phone) => match pick_contact_user(tx.users_by_phone(phone)?) {
            Some(u) => u,
            None if create => {
                let mut u = new_user(tx, ctx)?;
                u.phone = Some(phone.clone());
                tx.save_user(u.clone())?;
                u
            }
            None => return Ok(Resolved::Skip),
        },
        UserRef::Device(device) => match tx.user_by_device(device)? {
            Some(u) => u,
            None if create => {
                let u = new_user(tx, ctx)?;
                tx.put_device(u.seq, device)?;
                u
            }
            None => return Ok(Resolved::Skip),
        },
    };
    Ok(Resolved::User(Box::new(user)))
}

/// An `external_id` target, possibly with the `device_id` of an anonymous user to identify
/// (braze-api.md §7: a new external id identifies the anonymous user in place; an existing one
/// absorbs and orphans it) and an alias to attach.
fn resolve_external(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    ext: &ExternalId,
    target: &Target,
) -> Result<Resolved, StoreError> {
    let mut user = tx.user_by_external_id(ext)?;
    if let Some(device) = &target.device {
        let on_device = tx.user_by_device(device)?.filter(|d| !d.is_identified());
        match (&mut user, on_device) {
            (Some(known), Some(anon)) if anon.seq != known.seq => {
                merge_into(tx, ctx, &anon, known)?;
            }
            (None, Some(mut anon)) => {
                anon.external_id = Some(ext.clone());
                anon.updated_at = ctx.now;
                tx.save_user(anon.clone())?;
                user = Some(anon);
            }
            _ => {}
        }
    }
    let mut user = match user {
        Some(u) => u,
        None if !target.update_existing_only => {
            let braze_id = ctx.ids.braze_id();
            tx.create_user_with_external_id(braze_id, ext, ctx.now)?
        }
        None => return Ok(Resolved::Skip),
    };
    if let Some(device) = &target.device {
        tx.put_device(user.seq, device)?;
    }
    if let Some(alias) = &target.alias {
        attach_alias_if_free(tx, &mut user, alias)?;
    }
    Ok(Resolved::User(Box::new(user)))
}

/// Gives `user` the alias unless the pair belongs to someone or the user has that label.
fn attach_alias_if_free(
    tx: &mut dyn UserTx,
    user: &mut UserRecord,
    alias: &UserAlias,
) -> Result<bool, StoreError> {
    if tx.user_by_alias(alias)?.is_some()
        || tx
            .aliases_of(user.seq)?
            .iter()
            .any(|a| a.label == alias.label)
    {
        return Ok(false);
    }
    tx.put_alias(user.seq, alias)?;
    Ok(true)
}

fn device_of(target: &Target) -> Option<&DeviceId> {
    match &target.primary {
        UserRef::Device(d) => Some(d),
        _ => target.device.as_ref(),
    }
}

fn apply_attributes(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    user: &mut UserRecord,
    obj: &AttributeObject,
) -> Result<Option<String>, StoreError> {
    if let Some(name) = outgrown_nested(user, obj, ctx.max_array_len) {
        return Ok(Some(format!(
            "{}: it would grow past {} KiB",
            not_valid(name),
            MAX_NESTED_BYTES / 1024
        )));
    }
    let mut standard = Map::new();
    let mut custom = Map::new();
    match &obj.email {
        ContactChange::Set(e) if user.email.as_ref() != Some(e) => {
            user.email = Some(e.clone());
            standard.insert("email_address".into(), e.as_str().into());
        }
        ContactChange::Clear if user.email.is_some() => {
            user.email = None;
            standard.insert("email_address".into(), Value::Null);
        }
        _ => {}
    }
    match &obj.phone {
        ContactChange::Set(p) if user.phone.as_ref() != Some(p) => {
            user.phone = Some(p.clone());
            standard.insert("phone_number".into(), p.as_str().into());
        }
        ContactChange::Clear if user.phone.is_some() => {
            user.phone = None;
            standard.insert("phone_number".into(), Value::Null);
        }
        _ => {}
    }
    let mut changed_other_standard = false;
    let mut email_subscription = None;
    let mut group_states = Vec::new();
    for (field, value) in &obj.standard {
        let old = user.profile.standard.get(field);
        // Groups a request does not name keep their state: the new list is the old one with
        // the named groups set (Braze updates the groups it is sent, it does not replace).
        let merged;
        let value = match (field, value) {
            (StandardField::SubscriptionGroups, Some(new)) => {
                merged = Some(merged_groups(old, new));
                &merged
            }
            (StandardField::PushTokens, Some(new)) => {
                merged = Some(with_device_ids(old, new, || ctx.ids.event_id().0));
                &merged
            }
            (
                StandardField::DateOfFirstSession
                | StandardField::DateOfLastSession
                | StandardField::MarkedEmailAsSpamAt,
                Some(at),
            ) => match no_later_than(at, ctx.now) {
                Some(now) => {
                    merged = Some(now);
                    &merged
                }
                None => value,
            },
            _ => value,
        };
        if old == value.as_ref() {
            continue;
        }
        if *field == StandardField::SubscriptionGroups {
            group_states = changed_group_states(old, value.as_ref());
        }
        match value {
            Some(v) => user.profile.standard.insert(*field, v.clone()),
            None => user.profile.standard.remove(field),
        };
        match field.currents_name() {
            Some(name) => {
                standard.insert(name.into(), value.clone().unwrap_or(Value::Null));
            }
            // Its own event says it (below), not an empty profile update.
            None if *field == StandardField::EmailSubscribe => {
                email_subscription = value.as_ref().and_then(Value::as_str).map(str::to_owned);
            }
            None if *field == StandardField::SubscriptionGroups => {}
            None => changed_other_standard = true,
        }
    }
    for (name, change) in &obj.custom {
        if let Some(new) = apply_custom(&mut user.profile.custom, name, change, ctx.max_array_len) {
            custom.insert(name.clone(), new.unwrap_or(Value::Null));
        }
    }
    let source = MessageSource {
        app_group_id: &ctx.workspace.app_group_id,
        app_id: None,
        origin: Origin::AdHoc,
        dispatch_id: None,
        send_id: None,
    };
    if let Some(status) = &email_subscription {
        user.updated_at = ctx.now;
        let email = user.email.as_ref().map_or("", Email::as_str).to_owned();
        let event = CurrentsEvent::subscription_global_state_change(
            ctx.ids.event_id(),
            ctx.now,
            &ctx.event_user(user, None),
            &source,
            &email,
            status,
        );
        tx.append_event(Some(user.seq), event)?;
    }
    for (group, status) in &group_states {
        user.updated_at = ctx.now;
        let event = CurrentsEvent::subscription_group_state_change(
            ctx.ids.event_id(),
            ctx.now,
            &ctx.event_user(user, None),
            &source,
            group,
            status,
        );
        tx.append_event(Some(user.seq), event)?;
    }
    if standard.is_empty() && custom.is_empty() && !changed_other_standard {
        return Ok(None);
    }
    user.updated_at = ctx.now;
    let event = CurrentsEvent::profile_update(
        ctx.ids.event_id(),
        ctx.now,
        &ctx.event_user(user, None),
        &ctx.workspace.app_group_id,
        UPDATE_SOURCE_REST,
        standard,
        &custom,
    );
    tx.append_event(Some(user.seq), event)?;
    Ok(None)
}

/// `new` push tokens with a `device_id` in each (Braze: a random one when absent): the one the
/// same app's same token has in `old`, else a fresh one, so sending a token again changes
/// nothing.
fn with_device_ids(old: Option<&Value>, new: &Value, mut fresh: impl FnMut() -> String) -> Value {
    let key = |t: &Value| (t.get("app_id").cloned(), t.get("token").cloned());
    let known = |t: &Value| {
        old.and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|o| key(o) == key(t))
            .and_then(|o| o.get("device_id"))
            .filter(|d| d.is_string())
            .cloned()
    };
    let tokens = new.as_array().into_iter().flatten().map(|token| {
        let mut token = token.clone();
        if let Value::Object(fields) = &mut token
            && !fields.get("device_id").is_some_and(Value::is_string)
        {
            let id = known(&Value::Object(fields.clone())).unwrap_or_else(|| Value::from(fresh()));
            fields.insert("device_id".into(), id);
        }
        token
    });
    Value::Array(tokens.collect())
}

/// `old` subscription groups (stored entries `{subscription_group_id, subscription_state}`) with
/// each group of `new` set to its state, appended when it is new, in order.
fn merged_groups(old: Option<&Value>, new: &Value) -> Value {
    let id = |g: &Value| g.get("subscription_group_id").cloned();
    let mut groups: Vec<Value> = old.and_then(Value::as_array).cloned().unwrap_or_default();
    for group in new.as_array().into_iter().flatten() {
        match groups.iter_mut().find(|g| id(g) == id(group)) {
            Some(kept) => *kept = group.clone(),
            None => groups.push(group.clone()),
        }
    }
    Value::Array(groups)
}

/// The `(subscription_group_id, subscription_state)` pairs of `new` (a `subscription_groups`
/// array) whose state differs from the group's in `old`: each is one
/// `users.behaviors.subscriptiongroup.StateChange`.
fn changed_group_states(old: Option<&Value>, new: Option<&Value>) -> Vec<(String, String)> {
    let states = |v: Option<&Value>| -> Vec<(String, String)> {
        v.and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|g| {
                Some((
                    g.get("subscription_group_id")?.as_str()?.to_owned(),
                    g.get("subscription_state")?.as_str()?.to_owned(),
                ))
            })
            .collect()
    };
    let before = states(old);
    states(new)
        .into_iter()
        .filter(|(id, state)| !before.iter().any(|(i, s)| i == id && s == state))
        .collect()
}

/// The first nested attribute (an object merged into, an array of objects edited) that the
/// object's change would make larger than [`MAX_NESTED_BYTES`]. Each request's values are
/// bounded when parsed, but the stored result of a merge or `$add` grows with every request,
/// and the whole profile is rewritten on every change to the user: so the result is bounded
/// too, and an object that would pass the bound is refused whole.
fn outgrown_nested<'o>(
    user: &UserRecord,
    obj: &'o AttributeObject,
    max_array_len: usize,
) -> Option<&'o str> {
    obj.custom.iter().find_map(|(name, change)| {
        if !matches!(
            change,
            CustomChange::MergeObject(_) | CustomChange::ObjectArrayEdit { .. }
        ) {
            return None;
        }
        let mut probe = Map::new();
        if let Some(old) = user.profile.custom.get(name) {
            probe.insert(name.clone(), old.clone());
        }
        match apply_custom(&mut probe, name, change, max_array_len) {
            Some(Some(new)) if json_len(&new) > MAX_NESTED_BYTES => Some(name.as_str()),
            _ => None,
        }
    })
}

fn apply_event(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    user: &mut UserRecord,
    obj: &EventObject,
) -> Result<Option<String>, StoreError> {
    user.profile
        .events
        .entry(obj.name.clone())
        .and_modify(|o| o.record(obj.time, 1))
        .or_insert_with(|| Occurrences::once(obj.time));
    user.updated_at = ctx.now;
    let event = CurrentsEvent::custom_event(
        ctx.ids.event_id(),
        obj.time,
        &ctx.event_user(user, device_of(&obj.target)),
        &ctx.workspace.app_group_id,
        obj.app_id.as_deref(),
        &obj.name,
        &obj.properties,
    );
    tx.append_event(Some(user.seq), event)?;
    Ok(None)
}

fn apply_purchase(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    user: &mut UserRecord,
    obj: &PurchaseObject,
) -> Result<Option<String>, StoreError> {
    let quantity = u64::from(obj.quantity);
    user.profile
        .purchases
        .entry(obj.product_id.clone())
        .and_modify(|o| o.record(obj.time, quantity))
        .or_insert(Occurrences {
            first: obj.time,
            last: obj.time,
            count: quantity,
        });
    // Saturates like integer increments: a sum past f64::MAX would be infinite, which JSON
    // cannot hold (it would be stored as null and read back as 0).
    user.profile.total_revenue = (user.profile.total_revenue + obj.price * f64::from(obj.quantity))
        .clamp(-f64::MAX, f64::MAX);
    user.updated_at = ctx.now;
    // Braze: quantity N is treated as N purchases of quantity 1.
    for _ in 0..obj.quantity {
        let event = CurrentsEvent::purchase(
            ctx.ids.event_id(),
            obj.time,
            &ctx.event_user(user, device_of(&obj.target)),
            &ctx.workspace.app_group_id,
            obj.app_id.as_deref(),
            &obj.product_id,
            &obj.currency,
            obj.price,
            &obj.properties,
        );
        tx.append_event(Some(user.seq), event)?;
    }
    Ok(None)
}

/// Merges `source` into `target`: target absorbs the fields only source has, takes source's
/// aliases (unless it already has the label) and devices; source is orphaned (a
/// `users.UserOrphan` event) and deleted.
pub fn merge_into(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    source: &UserRecord,
    target: &mut UserRecord,
) -> Result<(), StoreError> {
    let source_aliases = tx.aliases_of(source.seq)?;
    let source_devices = tx.devices_of(source.seq)?;
    let target_labels: Vec<_> = tx
        .aliases_of(target.seq)?
        .into_iter()
        .map(|a| a.label)
        .collect();
    target.absorb(source);
    target.updated_at = ctx.now;
    let orphan = CurrentsEvent::orphan(
        ctx.ids.event_id(),
        ctx.now,
        &ctx.event_user(source, source_devices.first()),
        &ctx.workspace.app_group_id,
        &target.braze_id,
    );
    tx.append_event(Some(source.seq), orphan)?;
    // Memberships move before the delete, which would otherwise record the source leaving.
    tx.move_cohort_memberships(source.seq, target.seq, ctx.now)?;
    tx.record_merge(source.seq, target.seq, ctx.now)?;
    tx.delete_user(source.seq, ctx.now)?;
    for alias in source_aliases
        .iter()
        .filter(|a| !target_labels.contains(&a.label))
    {
        tx.put_alias(target.seq, alias)?;
    }
    for device in &source_devices {
        tx.put_device(target.seq, device)?;
    }
    tx.save_user(target.clone())
}

/// Per-item result of the batch endpoints (identify, alias, merge): how many were processed
/// and the non-fatal errors by index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ItemOutcome {
    pub processed: usize,
    pub errors: Vec<(usize, String)>,
}

/// Email / phone matching preference for identify and delete (Braze's `prioritization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prioritization {
    Identified,
    Unidentified,
    MostRecentlyUpdated,
    LeastRecentlyUpdated,
}

impl Prioritization {
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "identified" => Prioritization::Identified,
            "unidentified" => Prioritization::Unidentified,
            "most_recently_updated" => Prioritization::MostRecentlyUpdated,
            "least_recently_updated" => Prioritization::LeastRecentlyUpdated,
            _ => return None,
        })
    }
}

/// Picks one profile among those sharing an email/phone (given most recently updated first).
/// `None` when nothing matches or the rules leave several candidates.
pub fn prioritize(mut users: Vec<UserRecord>, rules: &[Prioritization]) -> Option<UserRecord> {
    for rule in rules {
        match rule {
            Prioritization::Identified => users.retain(UserRecord::is_identified),
            Prioritization::Unidentified => users.retain(|u| !u.is_identified()),
            Prioritization::MostRecentlyUpdated => users.truncate(1),
            Prioritization::LeastRecentlyUpdated => {
                let last = users.pop();
                users = last.into_iter().collect();
            }
        }
    }
    if users.len() == 1 { users.pop() } else { None }
}

/// What an identify item merges into the identified profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentifySource {
    Alias(UserAlias),
    Email(Email, Vec<Prioritization>),
    Phone(Phone, Vec<Prioritization>),
    /// Tideway's extension: the anonymous user of a device.
    Device(DeviceId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyItem {
    pub external_id: ExternalId,
    pub source: IdentifySource,
}

/// `/users/identify` (braze-api.md §4.1, §7).
pub fn identify(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    items: &[(usize, IdentifyItem)],
) -> Result<ItemOutcome, StoreError> {
    let mut out = ItemOutcome::default();
    for (index, item) in items {
        let source = match &item.source {
            IdentifySource::Alias(a) => tx.user_by_alias(a)?,
            IdentifySource::Device(d) => tx.user_by_device(d)?,
            IdentifySource::Email(e, rules) => prioritize(tx.users_by_email(e)?, rules),
            IdentifySource::Phone(p, rules) => prioritize(tx.users_by_phone(p)?, rules),
        };
        let Some(mut source) = source else {
            out.errors.push((
                *index,
                "no single user matches the identifier to identify".to_owned(),
            ));
            continue;
        };
        if let Some(existing) = &source.external_id {
            if existing == &item.external_id {
                out.processed += 1;
            } else {
                out.errors.push((
                    *index,
                    "the user to identify already has a different external_id".to_owned(),
                ));
            }
            continue;
        }
        match tx.user_by_external_id(&item.external_id)? {
            None => {
                source.external_id = Some(item.external_id.clone());
                source.updated_at = ctx.now;
                tx.save_user(source.clone())?;
            }
            Some(mut target) => {
                // One alias per label: if the target already has this label, do not combine.
                if let IdentifySource::Alias(alias) = &item.source
                    && tx
                        .aliases_of(target.seq)?
                        .iter()
                        .any(|a| a.label == alias.label)
                {
                    out.errors.push((
                        *index,
                        format!(
                            "the user with this external_id already has an alias labelled '{}'",
                            alias.label
                        ),
                    ));
                    continue;
                }
                merge_into(tx, ctx, &source, &mut target)?;
            }
        }
        out.processed += 1;
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasNewItem {
    pub external_id: Option<ExternalId>,
    pub alias: UserAlias,
}

/// `/users/alias/new` (braze-api.md §4.2).
pub fn alias_new(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    items: &[(usize, AliasNewItem)],
) -> Result<ItemOutcome, StoreError> {
    let mut out = ItemOutcome::default();
    for (index, item) in items {
        let owner = tx.user_by_alias(&item.alias)?;
        match &item.external_id {
            Some(ext) => match tx.user_by_external_id(ext)? {
                // Braze: with an unknown external_id the alias is added to no one.
                None => out.processed += 1,
                Some(user) if owner.as_ref().is_some_and(|o| o.seq == user.seq) => {
                    out.processed += 1
                }
                Some(_) if owner.is_some() => out.errors.push((
                    *index,
                    "this alias already belongs to another user".to_owned(),
                )),
                Some(user) => {
                    if tx
                        .aliases_of(user.seq)?
                        .iter()
                        .any(|a| a.label == item.alias.label)
                    {
                        out.errors.push((
                            *index,
                            format!(
                                "the user already has an alias labelled '{}'",
                                item.alias.label
                            ),
                        ));
                    } else {
                        tx.put_alias(user.seq, &item.alias)?;
                        out.processed += 1;
                    }
                }
            },
            None => {
                if owner.is_none() {
                    let user = new_user(tx, ctx)?;
                    tx.put_alias(user.seq, &item.alias)?;
                }
                out.processed += 1;
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasUpdateItem {
    pub old: UserAlias,
    pub new_name: crate::ids::AliasName,
}

/// `/users/alias/update`: renames an alias within its label.
pub fn alias_update(
    tx: &mut dyn UserTx,
    _ctx: &mut WriteCtx<'_>,
    items: &[(usize, AliasUpdateItem)],
) -> Result<ItemOutcome, StoreError> {
    let mut out = ItemOutcome::default();
    for (index, item) in items {
        let new = UserAlias {
            label: item.old.label.clone(),
            name: item.new_name.clone(),
        };
        let Some(user) = tx.user_by_alias(&item.old)? else {
            out.errors
                .push((*index, "no user has this alias".to_owned()));
            continue;
        };
        if tx.user_by_alias(&new)?.is_some() {
            out.errors
                .push((*index, "the new alias already exists".to_owned()));
            continue;
        }
        tx.remove_alias(&item.old)?;
        tx.put_alias(user.seq, &new)?;
        out.processed += 1;
    }
    Ok(out)
}

/// How `/users/merge` and `/users/delete` name a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserKey {
    External(ExternalId),
    Alias(UserAlias),
    Braze(BrazeId),
    Email(Email, Vec<Prioritization>),
    Phone(Phone),
}

impl UserKey {
    fn find(&self, tx: &mut dyn UserLookup) -> Result<Option<UserRecord>, StoreError> {
        match self {
            UserKey::External(e) => tx.user_by_external_id(e),
            UserKey::Alias(a) => tx.user_by_alias(a),
            UserKey::Braze(b) => tx.user_by_braze_id(b),
            UserKey::Email(e, rules) if rules.is_empty() => {
                Ok(pick_contact_user(tx.users_by_email(e)?))
            }
            UserKey::Email(e, rules) => Ok(prioritize(tx.users_by_email(e)?, rules)),
            UserKey::Phone(p) => Ok(pick_contact_user(tx.users_by_phone(p)?)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeItem {
    pub merge: UserKey,
    pub keep: UserKey,
}

/// `/users/merge`: folds one profile into another.
pub fn merge_users(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    items: &[(usize, MergeItem)],
) -> Result<ItemOutcome, StoreError> {
    let mut out = ItemOutcome::default();
    for (index, item) in items {
        let (Some(source), Some(mut target)) = (item.merge.find(tx)?, item.keep.find(tx)?) else {
            out.errors.push((
                *index,
                "both 'identifier_to_merge' and 'identifier_to_keep' must match a user".to_owned(),
            ));
            continue;
        };
        if source.seq == target.seq {
            out.errors.push((
                *index,
                "'identifier_to_merge' and 'identifier_to_keep' are the same user".to_owned(),
            ));
            continue;
        }
        merge_into(tx, ctx, &source, &mut target)?;
        out.processed += 1;
    }
    Ok(out)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteRequest {
    pub users: Vec<UserKey>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOutcome {
    pub deleted: usize,
}

/// `/users/delete`: each named user is erased and a `users.UserDeleteRequest` logged.
pub fn delete_users(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    req: &DeleteRequest,
) -> Result<DeleteOutcome, StoreError> {
    let mut out = DeleteOutcome::default();
    for key in &req.users {
        if let Some(user) = key.find(tx)? {
            let event = CurrentsEvent::delete_request(
                ctx.ids.event_id(),
                ctx.now,
                &user.braze_id,
                &ctx.workspace.app_group_id,
            );
            tx.append_event(Some(user.seq), event)?;
            tx.delete_user(user.seq, ctx.now)?;
            out.deleted += 1;
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenameItem {
    pub current: ExternalId,
    pub new: ExternalId,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenameOutcome {
    pub renamed: Vec<ExternalId>,
    pub errors: Vec<(ExternalId, String)>,
}

/// `/users/external_ids/rename`: the old id stays resolvable (deprecated) until removed.
pub fn rename_external_ids(
    tx: &mut dyn UserTx,
    ctx: &mut WriteCtx<'_>,
    items: &[RenameItem],
) -> Result<RenameOutcome, StoreError> {
    let mut out = RenameOutcome::default();
    for item in items {
        let user = tx.user_by_external_id(&item.current)?;
        let Some(mut user) = user.filter(|u| u.external_id.as_ref() == Some(&item.current)) else {
            out.errors.push((
                item.current.clone(),
                "'current_external_id' does not match a user's current external_id".to_owned(),
            ));
            continue;
        };
        if tx.user_by_external_id(&item.new)?.is_some() {
            out.errors.push((
                item.current.clone(),
                "'new_external_id' is already in use".to_owned(),
            ));
            continue;
        }
        user.external_id = Some(item.new.clone());
        user.updated_at = ctx.now;
        tx.save_user(user.clone())?;
        tx.put_deprecated_external_id(user.seq, &item.current)?;
        out.renamed.push(item.new.clone());
    }
    Ok(out)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoveOutcome {
    pub removed: Vec<ExternalId>,
    pub errors: Vec<(ExternalId, String)>,
}

/// `/users/external_ids/remove`: only deprecated ids can be removed.
pub fn remove_external_ids(
    tx: &mut dyn UserTx,
    ids: &[ExternalId],
) -> Result<RemoveOutcome, StoreError> {
    let mut out = RemoveOutcome::default();
    for id in ids {
        if tx.remove_deprecated_external_id(id)? {
            out.removed.push(id.clone());
        } else {
            out.errors
                .push((id.clone(), "not a deprecated external_id".to_owned()));
        }
    }
    Ok(out)
}

/// How `/users/export/ids` names users.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportRequest {
    pub external_ids: Vec<ExternalId>,
    pub aliases: Vec<UserAlias>,
    pub device_id: Option<DeviceId>,
    pub braze_id: Option<BrazeId>,
    pub email: Option<Email>,
    pub phone: Option<Phone>,
    /// Empty = every field.
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExportOutcome {
    pub users: Vec<Map<String, Value>>,
    pub invalid_user_ids: Vec<String>,
}

/// Every field `/users/export/ids` can return (for validating `fields_to_export`).
pub const EXPORT_FIELDS: [&str; 28] = [
    "appboy_id",
    "braze_id",
    "created_at",
    "external_id",
    "user_aliases",
    "device_ids",
    "first_name",
    "last_name",
    "email",
    "phone",
    "dob",
    "gender",
    "home_city",
    "country",
    "language",
    "time_zone",
    "last_coordinates",
    "email_subscribe",
    "push_subscribe",
    "custom_attributes",
    "custom_events",
    "purchases",
    "total_revenue",
    "random_bucket",
    "email_open_tracking_disabled",
    "email_click_tracking_disabled",
    "push_tokens",
    "subscription_groups",
];

/// Fields of Braze's export that `fields_to_export` may name but Tideway does not export: it
/// records no app sessions, devices' details, attribution, Content Cards or opt-in times, and
/// keeps the messages a user received in the Currents log and the campaign stats rather than
/// on the profile. A request naming them is answered without them, as Braze leaves out a
/// field a user has no value for; a name in neither list is refused.
pub const EXPORT_FIELDS_NOT_KEPT: [&str; 14] = [
    "apps",
    "attributed_ad",
    "attributed_adgroup",
    "attributed_campaign",
    "attributed_source",
    "campaigns_received",
    "canvases_received",
    "cards_clicked",
    "devices",
    "email_opted_in_at",
    "email_unsubscribed_at",
    "push_opted_in_at",
    "push_unsubscribed_at",
    "uninstalled_at",
];

/// `/users/export/ids`, in Braze's profile export shape. Read-only.
pub fn export_ids(
    tx: &mut dyn UserLookup,
    req: &ExportRequest,
) -> Result<ExportOutcome, StoreError> {
    let mut out = ExportOutcome::default();
    let mut found: Vec<UserRecord> = Vec::new();
    let push = |u: UserRecord, found: &mut Vec<UserRecord>| {
        if !found.iter().any(|f| f.seq == u.seq) {
            found.push(u);
        }
    };
    for ext in &req.external_ids {
        match tx.user_by_external_id(ext)? {
            Some(u) => push(u, &mut found),
            None => out.invalid_user_ids.push(ext.to_string()),
        }
    }
    for alias in &req.aliases {
        if let Some(u) = tx.user_by_alias(alias)? {
            push(u, &mut found);
        }
    }
    if let Some(d) = &req.device_id
        && let Some(u) = tx.user_by_device(d)?
    {
        push(u, &mut found);
    }
    if let Some(b) = &req.braze_id
        && let Some(u) = tx.user_by_braze_id(b)?
    {
        push(u, &mut found);
    }
    if let Some(e) = &req.email {
        for u in tx.users_by_email(e)? {
            push(u, &mut found);
        }
    }
    if let Some(p) = &req.phone {
        for u in tx.users_by_phone(p)? {
            push(u, &mut found);
        }
    }
    for user in found {
        let aliases = tx.aliases_of(user.seq)?;
        let devices = tx.devices_of(user.seq)?;
        out.users
            .push(export_user(&user, &aliases, &devices, &req.fields));
    }
    Ok(out)
}

fn export_user(
    user: &UserRecord,
    aliases: &[UserAlias],
    devices: &[DeviceId],
    fields: &[String],
) -> Map<String, Value> {
    use crate::profile::StandardField as F;
    let want = |name: &str| fields.is_empty() || fields.iter().any(|f| f == name);
    let mut m = Map::new();
    let std = |f: F| user.profile.standard.get(&f).cloned();
    let mut put = |name: &str, value: Option<Value>| {
        if want(name)
            && let Some(v) = value
        {
            m.insert(name.to_owned(), v);
        }
    };
    put("created_at", Some(user.created_at.to_iso().into()));
    put(
        "external_id",
        user.external_id.as_ref().map(|e| e.as_str().into()),
    );
    put(
        "user_aliases",
        Some(Value::Array(
            aliases
                .iter()
                .map(|a| json!({"alias_name": a.name.as_str(), "alias_label": a.label.as_str()}))
                .collect(),
        )),
    );
    put("braze_id", Some(user.braze_id.as_str().into()));
    put("appboy_id", Some(user.braze_id.as_str().into()));
    put(
        "device_ids",
        if devices.is_empty() {
            None
        } else {
            Some(devices.iter().map(|d| Value::from(d.as_str())).collect())
        },
    );
    put("first_name", std(F::FirstName));
    put("last_name", std(F::LastName));
    put("email", user.email.as_ref().map(|e| e.as_str().into()));
    put("phone", user.phone.as_ref().map(|p| p.as_str().into()));
    put("dob", std(F::Dob));
    put("gender", std(F::Gender));
    put("home_city", std(F::HomeCity));
    put("country", std(F::Country));
    put("language", std(F::Language));
    put("time_zone", std(F::TimeZone));
    put(
        "last_coordinates",
        std(F::CurrentLocation)
            .map(|loc| json!([loc["longitude"].clone(), loc["latitude"].clone()])),
    );
    put("email_subscribe", std(F::EmailSubscribe));
    put("push_subscribe", std(F::PushSubscribe));
    put(
        "email_open_tracking_disabled",
        std(F::EmailOpenTrackingDisabled),
    );
    put(
        "email_click_tracking_disabled",
        std(F::EmailClickTrackingDisabled),
    );
    put("push_tokens", std(F::PushTokens));
    put("subscription_groups", std(F::SubscriptionGroups));
    put(
        "custom_attributes",
        Some(Value::Object(user.profile.custom.clone())),
    );
    let occurrences = |list: &std::collections::BTreeMap<String, Occurrences>| -> Value {
        list.iter()
            .map(|(name, o)| json!({"name": name, "first": o.first.to_iso(), "last": o.last.to_iso(), "count": o.count}))
            .collect()
    };
    put("custom_events", Some(occurrences(&user.profile.events)));
    put("purchases", Some(occurrences(&user.profile.purchases)));
    put("total_revenue", Some(json!(user.profile.total_revenue)));
    put("random_bucket", Some(user.random_bucket().into()));
    m
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::track::parse_track;

    fn request(body: Value) -> TrackRequest {
        parse_track(body.as_object().expect("an object")).expect("a valid request")
    }

    #[test]
    fn track_keys_name_each_user_once_in_order() {
        let req = request(json!({
            "attributes": [{"external_id": "a", "x": 1}, {"external_id": "b", "x": 1}],
            "events": [{"external_id": "a", "name": "e", "time": "2025-01-01T00:00:00Z"},
                       {"user_alias": {"alias_label": "crm", "alias_name": "c"}, "name": "e", "time": "2025-01-01T00:00:00Z"}],
        }));
        let ext = |s: &str| LockKey::External(ExternalId::parse(s).expect("an id"));
        let keys = track_keys(&req).expect("every target has a lockable key");
        assert_eq!(keys.len(), 3);
        assert_eq!(&keys[..2], &[ext("a"), ext("b")]);
        assert!(matches!(&keys[2], LockKey::Alias(a) if a.name.as_str() == "c"));
    }

    #[test]
    fn a_target_by_email_names_no_keys() {
        let req = request(json!({
            "attributes": [{"external_id": "a", "x": 1}, {"email": "x@example.com", "x": 1}],
        }));
        assert_eq!(track_keys(&req), None);
    }
}
