//! The messaging Currents events: what a campaign or `/messages/send` dispatch emits as it
//! sends webhooks and email, and what the tracking endpoints emit on opens, clicks and
//! unsubscribes (`reference/braze-messaging.md` §8 says which action emits which).
//!
//! Every messaging event carries the same block of "where did this message come from"
//! properties (campaign or Canvas ids and names, variation, `dispatch_id`, `send_id`), but each
//! type lists a slightly different subset of them. Callers describe the message once, as a
//! [`MessageSource`], and each constructor writes the members its type lists in
//! `reference/currents-events.md`, nothing else. The envelope, the `user` object and the JSON
//! writer are the ones of [`crate::currents`], so these events are byte-for-byte what
//! `serde_json` would print, like the others.
//!
//! Conventions, shared with [`crate::currents`]:
//!
//! - properties come out in the reference's order (alphabetical), `user` members in the order
//!   `user_id, external_user_id, device_id, timezone`;
//! - an optional field that is unknown is omitted, never `null` (receivers accept either);
//! - a required field always comes out, with `""` when the caller has nothing better (the
//!   email address of an abort for a user who has none).
//!
//! Reference fields these constructors never write, and why:
//!
//! - `ip_pool`: Tideway has no IP pools;
//! - `esp`, `from_domain`, `sending_ip` on `Bounce`, `SoftBounce` and `Deferral`, and on
//!   `Open`/`Click`: only the delivery path knows them ([`EmailDeliveryInfo`]);
//! - `link_alias` on `Click`: Tideway has no link aliases;
//! - `state_change_source` on `GlobalStateChange` and `subscriptiongroup.StateChange`: Braze's
//!   values for it are not documented (unverified), and an invented value would mislead
//!   receivers that switch on Braze's;
//! - `channel`, `channel_identifier`, `email_address`, `phone_number` and `dispatch_id` on
//!   `subscriptiongroup.StateChange`: a change made through `/users/track` has no message, and
//!   a group's channel is not part of Tideway's profile;
//! - `canvas_step_message_variation_id` ([`Origin::Canvas`]): none of these types lists it.

use crate::clock::Millis;
use crate::currents::{BASE_CAPACITY, CurrentsEvent, EventType, EventUser, JsonObject, user_keys};
use crate::ids::EventId;

/// What a message was sent for: the campaign or Canvas (step) it belongs to, or neither for an
/// ad-hoc `/messages/send`. Names are optional because an event may be built after the
/// campaign was deleted, when only its id is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    Campaign {
        campaign_id: &'a str,
        campaign_name: Option<&'a str>,
        /// The variant sent (or the control group's id for `EnrollInControl`).
        message_variation_id: Option<&'a str>,
        message_variation_name: Option<&'a str>,
    },
    Canvas {
        canvas_id: &'a str,
        canvas_name: Option<&'a str>,
        canvas_variation_id: Option<&'a str>,
        canvas_variation_name: Option<&'a str>,
        canvas_step_id: Option<&'a str>,
        canvas_step_name: Option<&'a str>,
        /// Kept for the message types that list it (banners); none of the email, webhook or
        /// conversion types built here does, so it is not written.
        canvas_step_message_variation_id: Option<&'a str>,
    },
    /// `/messages/send` without a `campaign_id`: no campaign or Canvas fields at all.
    AdHoc,
}

/// The properties every messaging event shares: built once per send (or per tracked
/// engagement) and passed to each constructor, which writes what its type lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageSource<'a> {
    pub app_group_id: &'a str,
    /// Written only by the types that list `app_id` (`campaigns.*`, `canvas.Conversion`,
    /// `GlobalStateChange`); server-side sends have none.
    pub app_id: Option<&'a str>,
    pub origin: Origin<'a>,
    /// The dispatch (per-user when the campaign asks for per-user dispatch ids).
    pub dispatch_id: Option<&'a str>,
    /// The `send_id` the API call named, for per-send analytics.
    pub send_id: Option<&'a str>,
}

/// What the delivery path knows about the hop that accepted an email
/// (`users.messages.email.Delivery`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmailDeliveryInfo<'a> {
    pub esp: Option<&'a str>,
    pub from_domain: Option<&'a str>,
    pub sending_ip: Option<&'a str>,
}

/// One failed webhook attempt (`users.messages.webhook.Failure`), as the dispatcher observed
/// it. Sizes and durations are `i64` as measured; the wire type is a 32-bit int, so larger
/// values are written as `i32::MAX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookFailure<'a> {
    /// `None` when no response came (timeout, connection refused).
    pub http_status_code: Option<i32>,
    /// Owned because the dispatcher redacts the query string first.
    pub endpoint_url: Option<String>,
    pub host: Option<&'a str>,
    pub url_path: Option<&'a str>,
    /// The response body, already truncated by the caller.
    pub raw_response: Option<&'a str>,
    pub content_length: Option<i64>,
    /// Written as `webhook_duration` (milliseconds).
    pub webhook_duration_ms: Option<i64>,
    /// Attempts made before this one (0 on the first).
    pub retry_count: i32,
    /// The last attempt: no retry follows.
    pub is_terminal: bool,
    /// Written as `webhook_failure_source`: `"External Endpoint"` when the receiver answered
    /// badly or not at all.
    pub failure_source: &'a str,
}

/// What the open/click tracking endpoints learn from a request's `User-Agent`.
/// `tideway_messaging::tracking::classify_user_agent` returns it; it lives here because the
/// event constructors need it and `tideway-core` cannot depend on `tideway-messaging`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserAgentInfo {
    /// `device_class`, e.g. `"desktop"`, `"mobile"`, `"tablet"`.
    pub device_class: Option<String>,
    /// `device_os`, e.g. `"iOS"`, `"Windows"`.
    pub device_os: Option<String>,
    pub device_model: Option<String>,
    pub browser: Option<String>,
    /// When the agent is a mailbox provider's proxy (Gmail's image proxy, …).
    pub mailbox_provider: Option<String>,
    /// A known proxy, prefetcher or link scanner rather than a person (Apple Mail Privacy
    /// Protection, security gateways). An open then carries `machine_open: "true"`, a click
    /// `is_suspected_bot_click: true` with reason `["user_agent"]`.
    pub machine: bool,
}

/// The reason written in `suspected_bot_click_reason` when [`UserAgentInfo::machine`] is set:
/// the only evidence Tideway uses is the user agent (our choice; Braze's vocabulary for the
/// reasons is unverified).
const BOT_REASON_USER_AGENT: &str = "user_agent";

/// `users.behaviors.subscription.GlobalStateChange` from a tracking link is always about email.
const CHANNEL_EMAIL: &str = "email";

impl CurrentsEvent {
    /// `users.campaigns.EnrollInControl`: a campaign send put the user in its control group.
    /// `source.origin` is the campaign, its `message_variation_id` the control's.
    pub fn campaign_enroll_in_control(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
    ) -> Self {
        Self::build(
            id,
            EventType::CampaignEnrollInControl,
            at,
            capacity(source, 0),
            |o| user_keys(o, user, true, true, true),
            |o| {
                app_ids(o, source);
                campaign_only(o, &source.origin);
                o.opt_str("dispatch_id", source.dispatch_id);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.campaigns.Conversion`: the user performed conversion event
    /// `conversion_behavior_index` (0 = primary) of the campaign in its window;
    /// `conversion_behavior` is that event's definition as JSON text.
    pub fn campaign_conversion(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        conversion_behavior_index: i32,
        conversion_behavior: &str,
    ) -> Self {
        Self::build(
            id,
            EventType::CampaignConversion,
            at,
            capacity(source, conversion_behavior.len()),
            |o| user_keys(o, user, true, true, true),
            |o| {
                app_ids(o, source);
                campaign_only(o, &source.origin);
                o.str("conversion_behavior", conversion_behavior);
                o.i64(
                    "conversion_behavior_index",
                    conversion_behavior_index.into(),
                );
                o.opt_str("dispatch_id", source.dispatch_id);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.canvas.Conversion`: as [`CurrentsEvent::campaign_conversion`] for a Canvas
    /// (`source.origin` is the Canvas; the type has no dispatch or send id).
    pub fn canvas_conversion(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        conversion_behavior_index: i32,
        conversion_behavior: &str,
    ) -> Self {
        Self::build(
            id,
            EventType::CanvasConversion,
            at,
            capacity(source, conversion_behavior.len()),
            |o| user_keys(o, user, true, true, true),
            |o| {
                app_ids(o, source);
                canvas_only(o, &source.origin);
                o.str("conversion_behavior", conversion_behavior);
                o.i64(
                    "conversion_behavior_index",
                    conversion_behavior_index.into(),
                );
            },
        )
    }

    /// `users.messages.email.Send`: the MTA accepted the message for delivery.
    /// `message_extras` is the JSON text of the message's extras, if it has any.
    pub fn email_send(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        email_address: &str,
        message_extras: Option<&str>,
    ) -> Self {
        Self::build(
            id,
            EventType::EmailSend,
            at,
            capacity(source, email_address.len() + opt_len(message_extras)),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                origin(o, &source.origin);
                o.opt_str("dispatch_id", source.dispatch_id);
                o.str("email_address", email_address);
                o.opt_str("message_extras", message_extras);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.messages.email.Delivery`: the receiving server answered 250.
    pub fn email_delivery(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        email_address: &str,
        info: &EmailDeliveryInfo<'_>,
    ) -> Self {
        Self::build(
            id,
            EventType::EmailDelivery,
            at,
            capacity(source, email_address.len()),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                origin(o, &source.origin);
                o.opt_str("dispatch_id", source.dispatch_id);
                o.str("email_address", email_address);
                o.opt_str("esp", info.esp);
                o.opt_str("from_domain", info.from_domain);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
                o.opt_str("sending_ip", info.sending_ip);
            },
        )
    }

    /// `users.messages.email.Bounce`: a permanent (5xx) refusal. `bounce_reason` is the SMTP
    /// code and text; `is_drop` says the message was dropped without being tried (the wire
    /// field is a boolean, hence the parameter).
    pub fn email_bounce(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        email_address: &str,
        bounce_reason: &str,
        is_drop: bool,
    ) -> Self {
        Self::build(
            id,
            EventType::EmailBounce,
            at,
            capacity(source, email_address.len() + bounce_reason.len()),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                o.str("bounce_reason", bounce_reason);
                origin(o, &source.origin);
                o.opt_str("dispatch_id", source.dispatch_id);
                o.str("email_address", email_address);
                o.bool("is_drop", is_drop);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.messages.email.SoftBounce`: the first temporary (4xx) refusal.
    pub fn email_soft_bounce(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        email_address: &str,
        bounce_reason: &str,
    ) -> Self {
        Self::build(
            id,
            EventType::EmailSoftBounce,
            at,
            capacity(source, email_address.len() + bounce_reason.len()),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                o.str("bounce_reason", bounce_reason);
                origin(o, &source.origin);
                o.opt_str("dispatch_id", source.dispatch_id);
                o.str("email_address", email_address);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.messages.email.Deferral`: a retry was refused temporarily again.
    /// `attempt_count` counts attempts including this one.
    #[allow(clippy::too_many_arguments)]
    pub fn email_deferral(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        email_address: &str,
        attempt_count: i32,
        deferral_reason: &str,
        recipient_domain: Option<&str>,
    ) -> Self {
        Self::build(
            id,
            EventType::EmailDeferral,
            at,
            capacity(source, email_address.len() + deferral_reason.len()),
            // The reference lists no `device_id` for this type.
            |o| user_keys(o, user, true, false, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                o.i64("attempt_count", attempt_count.into());
                origin(o, &source.origin);
                o.str("deferral_reason", deferral_reason);
                o.opt_str("dispatch_id", source.dispatch_id);
                o.str("email_address", email_address);
                variation(o, &source.origin);
                o.opt_str("recipient_domain", recipient_domain);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.messages.email.Abort`: the email was not sent. `email_address` is `""` when the
    /// user has none (the field is required).
    pub fn email_abort(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        email_address: &str,
        abort_type: &str,
        abort_log: Option<&str>,
    ) -> Self {
        Self::build(
            id,
            EventType::EmailAbort,
            at,
            capacity(source, email_address.len() + opt_len(abort_log)),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.opt_str("abort_log", abort_log);
                o.str("abort_type", abort_type);
                o.str("app_group_id", source.app_group_id);
                origin(o, &source.origin);
                o.opt_str("dispatch_id", source.dispatch_id);
                o.str("email_address", email_address);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.messages.email.Open`: the open pixel was fetched. `is_amp` is always false:
    /// Tideway sends no AMP part.
    pub fn email_open(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        email_address: &str,
        user_agent: Option<&str>,
        agent: &UserAgentInfo,
    ) -> Self {
        Self::build(
            id,
            EventType::EmailOpen,
            at,
            capacity(source, email_address.len() + opt_len(user_agent) + 64),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                o.opt_str("browser", agent.browser.as_deref());
                origin(o, &source.origin);
                device(o, agent);
                o.opt_str("dispatch_id", source.dispatch_id);
                o.str("email_address", email_address);
                o.bool("is_amp", false);
                // A string on the wire, and present only for machine opens (Braze's shape).
                if agent.machine {
                    o.str("machine_open", "true");
                }
                o.opt_str("mailbox_provider", agent.mailbox_provider.as_deref());
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
                o.opt_str("user_agent", user_agent);
            },
        )
    }

    /// `users.messages.email.Click`: a tracked link was followed. `link_id` is the link's
    /// index in the message; `url` the original target.
    #[allow(clippy::too_many_arguments)]
    pub fn email_click(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        email_address: &str,
        url: &str,
        link_id: &str,
        user_agent: Option<&str>,
        agent: &UserAgentInfo,
    ) -> Self {
        Self::build(
            id,
            EventType::EmailClick,
            at,
            capacity(
                source,
                email_address.len() + url.len() + opt_len(user_agent) + 96,
            ),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                o.opt_str("browser", agent.browser.as_deref());
                origin(o, &source.origin);
                device(o, agent);
                o.opt_str("dispatch_id", source.dispatch_id);
                o.str("email_address", email_address);
                o.bool("is_amp", false);
                o.bool("is_suspected_bot_click", agent.machine);
                o.str("link_id", link_id);
                o.opt_str("mailbox_provider", agent.mailbox_provider.as_deref());
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
                if agent.machine {
                    o.strs("suspected_bot_click_reason", &[BOT_REASON_USER_AGENT]);
                }
                o.str("url", url);
                o.opt_str("user_agent", user_agent);
            },
        )
    }

    /// `users.messages.email.Unsubscribe`: the unsubscribe link (or `List-Unsubscribe`) was
    /// used. Followed by [`CurrentsEvent::subscription_global_state_change`].
    pub fn email_unsubscribe(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        email_address: &str,
    ) -> Self {
        Self::build(
            id,
            EventType::EmailUnsubscribe,
            at,
            capacity(source, email_address.len()),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                origin(o, &source.origin);
                o.opt_str("dispatch_id", source.dispatch_id);
                o.str("email_address", email_address);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.behaviors.subscription.GlobalStateChange` for the email channel, after a
    /// tracking link changed `email_subscribe` to `subscription_status` (`"unsubscribed"`,
    /// `"subscribed"`, `"opted_in"`). `channel_identifier` is the address. The type has no
    /// `dispatch_id`.
    pub fn subscription_global_state_change(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        email_address: &str,
        subscription_status: &str,
    ) -> Self {
        Self::build(
            id,
            EventType::SubscriptionGlobalStateChange,
            at,
            capacity(source, 2 * email_address.len()),
            // The reference lists no `device_id` for this type.
            |o| user_keys(o, user, true, false, true),
            |o| {
                app_ids(o, source);
                origin(o, &source.origin);
                o.str("channel", CHANNEL_EMAIL);
                o.str("channel_identifier", email_address);
                o.str("email_address", email_address);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
                o.str("subscription_status", subscription_status);
            },
        )
    }

    /// `users.behaviors.subscriptiongroup.StateChange`: the user's state in subscription group
    /// `group_id` became `subscription_status` (as `subscription_groups` gave it). The group's
    /// channel is not known here, so `channel` is not written.
    pub fn subscription_group_state_change(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        group_id: &str,
        subscription_status: &str,
    ) -> Self {
        Self::build(
            id,
            EventType::SubscriptionGroupStateChange,
            at,
            capacity(source, group_id.len() + subscription_status.len()),
            |o| user_keys(o, user, true, true, true),
            |o| {
                app_ids(o, source);
                origin(o, &source.origin);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
                o.str("subscription_group_id", group_id);
                o.str("subscription_status", subscription_status);
            },
        )
    }

    /// `users.messages.webhook.Send`: the endpoint answered 2xx.
    pub fn webhook_send(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        message_extras: Option<&str>,
    ) -> Self {
        Self::build(
            id,
            EventType::WebhookSend,
            at,
            capacity(source, opt_len(message_extras)),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                origin(o, &source.origin);
                o.opt_str("dispatch_id", source.dispatch_id);
                o.opt_str("message_extras", message_extras);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.messages.webhook.Failure`: one attempt failed (non-2xx, timeout, connection
    /// error); `is_terminal` on the last.
    pub fn webhook_failure(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        failure: &WebhookFailure<'_>,
    ) -> Self {
        let extra = failure.endpoint_url.as_ref().map_or(0, String::len)
            + opt_len(failure.raw_response)
            + 128;
        Self::build(
            id,
            EventType::WebhookFailure,
            at,
            capacity(source, extra),
            // The reference lists neither `device_id` nor `timezone` for this type.
            |o| user_keys(o, user, true, false, false),
            |o| {
                o.str("app_group_id", source.app_group_id);
                origin(o, &source.origin);
                if let Some(n) = failure.content_length {
                    o.i64("content_length", wire_int(n));
                }
                o.opt_str("dispatch_id", source.dispatch_id);
                o.opt_str("endpoint_url", failure.endpoint_url.as_deref());
                o.opt_str("host", failure.host);
                if let Some(code) = failure.http_status_code {
                    o.i64("http_status_code", code.into());
                }
                o.bool("is_terminal", failure.is_terminal);
                variation(o, &source.origin);
                o.opt_str("raw_response", failure.raw_response);
                o.i64("retry_count", failure.retry_count.into());
                o.opt_str("send_id", source.send_id);
                o.opt_str("url_path", failure.url_path);
                if let Some(ms) = failure.webhook_duration_ms {
                    o.i64("webhook_duration", wire_int(ms));
                }
                o.str("webhook_failure_source", failure.failure_source);
            },
        )
    }

    /// `users.messages.webhook.Retry`: an attempt failed and another is scheduled.
    /// `retry_type` says why (`"http_status"`, `"connection"`), `retry_log` the detail.
    pub fn webhook_retry(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        retry_type: &str,
        retry_log: &str,
    ) -> Self {
        Self::build(
            id,
            EventType::WebhookRetry,
            at,
            capacity(source, retry_log.len()),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                origin(o, &source.origin);
                o.opt_str("dispatch_id", source.dispatch_id);
                variation(o, &source.origin);
                o.str("retry_log", retry_log);
                o.str("retry_type", retry_type);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.messages.webhook.Abort`: the webhook was not sent (`abort_type` e.g.
    /// `liquid_abort_message`, `blocked_webhook_url`).
    pub fn webhook_abort(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        abort_type: &str,
        abort_log: Option<&str>,
    ) -> Self {
        Self::build(
            id,
            EventType::WebhookAbort,
            at,
            capacity(source, opt_len(abort_log)),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.opt_str("abort_log", abort_log);
                o.str("abort_type", abort_type);
                o.str("app_group_id", source.app_group_id);
                origin(o, &source.origin);
                o.opt_str("dispatch_id", source.dispatch_id);
                variation(o, &source.origin);
                o.opt_str("send_id", source.send_id);
            },
        )
    }

    /// `users.canvas.Entry`: the user entered the Canvas (`source.origin` is the Canvas, its
    /// step the first step; `in_control_group` when the user was put in the control group).
    pub fn canvas_entry(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        in_control_group: bool,
    ) -> Self {
        Self::build(
            id,
            EventType::CanvasEntry,
            at,
            capacity(source, 0),
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", source.app_group_id);
                canvas_only(o, &source.origin);
                o.bool("in_control_group", in_control_group);
            },
        )
    }

    /// `users.canvasstep.Progression`: the user moved on from the step of `source.origin`
    /// (`progression_type` `"advance"` to `next_step_id`, or `"exit"` with `exit_reason`);
    /// `is_canvas_entry` on the progression into the first step.
    pub fn canvas_progression(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        progression: &Progression<'_>,
    ) -> Self {
        Self::build(
            id,
            EventType::CanvasStepProgression,
            at,
            capacity(source, progression.canvas_entry_id.len() + 96),
            |o| user_keys(o, user, true, true, false),
            |o| {
                o.str("app_group_id", source.app_group_id);
                o.str("canvas_entry_id", progression.canvas_entry_id);
                self::origin(o, &source.origin);
                o.opt_str("exit_reason", progression.exit_reason);
                if progression.is_canvas_entry {
                    o.bool("is_canvas_entry", true);
                }
                o.opt_str("next_step_id", progression.next_step_id);
                o.str("progression_type", progression.progression_type);
            },
        )
    }

    /// `users.canvas.exit.PerformedEvent` (an exception event) or
    /// `users.canvas.exit.MatchedAudience` (the exit filter), at the step of `source.origin`.
    pub fn canvas_exit(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        matched_audience: bool,
    ) -> Self {
        let event_type = if matched_audience {
            EventType::CanvasExitMatchedAudience
        } else {
            EventType::CanvasExitPerformedEvent
        };
        Self::build(
            id,
            event_type,
            at,
            capacity(source, 0),
            |o| user_keys(o, user, true, false, false),
            |o| {
                o.str("app_group_id", source.app_group_id);
                canvas_only(o, &source.origin);
            },
        )
    }

    /// `users.canvas.experimentstep.SplitEntry`: the user was assigned a path of the
    /// Experiment Paths step of `source.origin`.
    pub fn canvas_split_entry(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        split_id: &str,
        split_name: &str,
        in_control_group: bool,
    ) -> Self {
        let step = match source.origin {
            Origin::Canvas { canvas_step_id, .. } => canvas_step_id,
            _ => None,
        };
        Self::build(
            id,
            EventType::CanvasExperimentSplitEntry,
            at,
            capacity(source, split_id.len() + split_name.len()),
            |o| user_keys(o, user, true, false, false),
            |o| {
                self::origin(o, &source.origin);
                o.str("experiment_split_id", split_id);
                o.str("experiment_split_name", split_name);
                o.opt_str("experiment_step_id", step);
                o.bool("in_control_group", in_control_group);
            },
        )
    }
}

/// What a `users.canvasstep.Progression` says besides its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progression<'a> {
    /// The journey: one per entry of the user into the Canvas.
    pub canvas_entry_id: &'a str,
    /// `"advance"` or `"exit"`.
    pub progression_type: &'a str,
    pub next_step_id: Option<&'a str>,
    /// One of `exception_event`, `matched_audience`, `past_delay`, `end_of_path`, `stopped`.
    pub exit_reason: Option<&'a str>,
    pub is_canvas_entry: bool,
}

/// `app_group_id`, `app_id`: adjacent in every type that lists `app_id`.
fn app_ids(o: &mut JsonObject, source: &MessageSource<'_>) {
    o.str("app_group_id", source.app_group_id);
    o.opt_str("app_id", source.app_id);
}

/// The campaign or Canvas members, `campaign_id` … `canvas_variation_name`: they sort next
/// to each other in every message type, so one call writes them in the reference's order.
fn origin(o: &mut JsonObject, origin: &Origin<'_>) {
    match *origin {
        Origin::Campaign {
            campaign_id,
            campaign_name,
            ..
        } => {
            o.str("campaign_id", campaign_id);
            o.opt_str("campaign_name", campaign_name);
        }
        Origin::Canvas {
            canvas_id,
            canvas_name,
            canvas_variation_id,
            canvas_variation_name,
            canvas_step_id,
            canvas_step_name,
            canvas_step_message_variation_id: _,
        } => {
            o.str("canvas_id", canvas_id);
            o.opt_str("canvas_name", canvas_name);
            o.opt_str("canvas_step_id", canvas_step_id);
            o.opt_str("canvas_step_name", canvas_step_name);
            o.opt_str("canvas_variation_id", canvas_variation_id);
            o.opt_str("canvas_variation_name", canvas_variation_name);
        }
        Origin::AdHoc => {}
    }
}

/// `message_variation_id`, `message_variation_name`: campaigns only (a Canvas step's variant
/// is its `canvas_variation_*`).
fn variation(o: &mut JsonObject, origin: &Origin<'_>) {
    if let Origin::Campaign {
        message_variation_id,
        message_variation_name,
        ..
    } = *origin
    {
        o.opt_str("message_variation_id", message_variation_id);
        o.opt_str("message_variation_name", message_variation_name);
    }
}

/// For the `users.campaigns.*` types, where `campaign_id` is required and no Canvas member is
/// listed. Callers always pass a campaign; anything else is a bug, caught in debug builds,
/// and still yields a well-formed event (`campaign_id: ""`) in release ones.
fn campaign_only(o: &mut JsonObject, origin: &Origin<'_>) {
    match *origin {
        Origin::Campaign { .. } => self::origin(o, origin),
        Origin::Canvas { .. } | Origin::AdHoc => {
            debug_assert!(false, "a users.campaigns event for {origin:?}");
            o.str("campaign_id", "");
        }
    }
}

/// For `users.canvas.Conversion`, where `canvas_id` and `canvas_variation_id` are required
/// and no campaign member is listed. As [`campaign_only`], a non-Canvas origin is a bug.
fn canvas_only(o: &mut JsonObject, origin: &Origin<'_>) {
    match *origin {
        Origin::Canvas {
            canvas_id,
            canvas_name,
            canvas_variation_id,
            canvas_variation_name,
            canvas_step_id,
            canvas_step_name,
            canvas_step_message_variation_id: _,
        } => {
            o.str("canvas_id", canvas_id);
            o.opt_str("canvas_name", canvas_name);
            o.opt_str("canvas_step_id", canvas_step_id);
            o.opt_str("canvas_step_name", canvas_step_name);
            o.str(
                "canvas_variation_id",
                canvas_variation_id.unwrap_or_default(),
            );
            o.opt_str("canvas_variation_name", canvas_variation_name);
        }
        Origin::Campaign { .. } | Origin::AdHoc => {
            debug_assert!(false, "a users.canvas event for {origin:?}");
            o.str("canvas_id", "");
            o.str("canvas_variation_id", "");
        }
    }
}

/// The `device_*` members of `Open` and `Click` (they sort together, after the origin).
fn device(o: &mut JsonObject, agent: &UserAgentInfo) {
    o.opt_str("device_class", agent.device_class.as_deref());
    o.opt_str("device_model", agent.device_model.as_deref());
    o.opt_str("device_os", agent.device_os.as_deref());
}

/// A measured size or duration on a 32-bit wire field: saturated rather than wrapped, so a
/// receiver that checks the type never sees an out-of-range number.
fn wire_int(n: i64) -> i64 {
    n.clamp(i32::MIN.into(), i32::MAX.into())
}

fn opt_len(s: Option<&str>) -> usize {
    s.map_or(0, str::len)
}

/// Buffer size for one event: the fixed part, the source's strings, and `extra` for the
/// type's own variable-length fields.
fn capacity(source: &MessageSource<'_>, extra: usize) -> usize {
    let origin = match source.origin {
        Origin::Campaign {
            campaign_id,
            campaign_name,
            message_variation_id,
            message_variation_name,
        } => {
            campaign_id.len()
                + opt_len(campaign_name)
                + opt_len(message_variation_id)
                + opt_len(message_variation_name)
                + 96
        }
        Origin::Canvas {
            canvas_id,
            canvas_name,
            canvas_variation_id,
            canvas_variation_name,
            canvas_step_id,
            canvas_step_name,
            canvas_step_message_variation_id: _,
        } => {
            canvas_id.len()
                + opt_len(canvas_name)
                + opt_len(canvas_variation_id)
                + opt_len(canvas_variation_name)
                + opt_len(canvas_step_id)
                + opt_len(canvas_step_name)
                + 160
        }
        Origin::AdHoc => 0,
    };
    BASE_CAPACITY
        + source.app_group_id.len()
        + opt_len(source.app_id)
        + opt_len(source.dispatch_id)
        + opt_len(source.send_id)
        + origin
        + extra
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{BrazeId, DeviceId, ExternalId};
    use serde_json::Value;

    const CAMPAIGN: Origin<'static> = Origin::Campaign {
        campaign_id: "cmp",
        campaign_name: Some("Spring"),
        message_variation_id: Some("var"),
        message_variation_name: Some("Variant 1"),
    };

    const CANVAS: Origin<'static> = Origin::Canvas {
        canvas_id: "cnv",
        canvas_name: Some("Onboarding"),
        canvas_variation_id: Some("cvar"),
        canvas_variation_name: Some("Path A"),
        canvas_step_id: Some("step"),
        canvas_step_name: Some("Welcome"),
        canvas_step_message_variation_id: Some("smv"),
    };

    /// Every optional input present.
    fn full_source(origin: Origin<'static>) -> MessageSource<'static> {
        MessageSource {
            app_group_id: "ag",
            app_id: Some("app"),
            origin,
            dispatch_id: Some("dsp"),
            send_id: Some("snd"),
        }
    }

    /// Every optional input absent.
    fn bare_source(origin: Origin<'static>) -> MessageSource<'static> {
        MessageSource {
            app_group_id: "ag",
            app_id: None,
            origin,
            dispatch_id: None,
            send_id: None,
        }
    }

    fn machine_agent() -> UserAgentInfo {
        UserAgentInfo {
            device_class: Some("desktop".into()),
            device_os: Some("macOS".into()),
            device_model: Some("Mac".into()),
            browser: Some("Safari".into()),
            mailbox_provider: Some("Apple".into()),
            machine: true,
        }
    }

    fn full_failure() -> WebhookFailure<'static> {
        WebhookFailure {
            http_status_code: Some(503),
            endpoint_url: Some("https://h.example/p".into()),
            host: Some("h.example"),
            url_path: Some("/p"),
            raw_response: Some("busy"),
            content_length: Some(4),
            webhook_duration_ms: Some(120),
            retry_count: 2,
            is_terminal: true,
            failure_source: "External Endpoint",
        }
    }

    fn bare_failure() -> WebhookFailure<'static> {
        WebhookFailure {
            http_status_code: None,
            endpoint_url: None,
            host: None,
            url_path: None,
            raw_response: None,
            content_length: None,
            webhook_duration_ms: None,
            retry_count: 0,
            is_terminal: false,
            failure_source: "External Endpoint",
        }
    }

    /// One event of every messaging type, from `source`; `full` fills every optional
    /// type-specific input too. Canvas conversions only for a Canvas origin, campaign-only
    /// types only for a campaign one (anything else is a caller bug).
    fn every_event(
        user: &EventUser<'_>,
        source: &MessageSource<'_>,
        full: bool,
    ) -> Vec<CurrentsEvent> {
        let at = Millis(1_700_000_000_123);
        let id = || EventId("e".into());
        let opt = |s: &'static str| full.then_some(s);
        let agent = if full {
            machine_agent()
        } else {
            UserAgentInfo::default()
        };
        let failure = if full { full_failure() } else { bare_failure() };
        let delivery = if full {
            EmailDeliveryInfo {
                esp: Some("tideway"),
                from_domain: Some("example.com"),
                sending_ip: Some("192.0.2.1"),
            }
        } else {
            EmailDeliveryInfo::default()
        };
        let (e, s) = (user, source);
        let a = "a@example.com";
        let mut out = vec![
            CurrentsEvent::email_send(id(), at, e, s, a, opt("{\"k\":\"v\"}")),
            CurrentsEvent::email_delivery(id(), at, e, s, a, &delivery),
            CurrentsEvent::email_bounce(id(), at, e, s, a, "550 no such user", full),
            CurrentsEvent::email_soft_bounce(id(), at, e, s, a, "421 try later"),
            CurrentsEvent::email_deferral(id(), at, e, s, a, 2, "421 busy", opt("example.com")),
            CurrentsEvent::email_abort(id(), at, e, s, a, "missing_email", opt("no address")),
            CurrentsEvent::email_open(id(), at, e, s, a, opt("Mozilla/5.0"), &agent),
            CurrentsEvent::email_click(
                id(),
                at,
                e,
                s,
                a,
                "https://x.example/",
                "0",
                opt("Mozilla/5.0"),
                &agent,
            ),
            CurrentsEvent::email_unsubscribe(id(), at, e, s, a),
            CurrentsEvent::subscription_global_state_change(id(), at, e, s, a, "unsubscribed"),
            CurrentsEvent::webhook_send(id(), at, e, s, opt("{}")),
            CurrentsEvent::webhook_failure(id(), at, e, s, &failure),
            CurrentsEvent::webhook_retry(id(), at, e, s, "http_status", "503 busy"),
            CurrentsEvent::webhook_abort(id(), at, e, s, "blocked_webhook_url", opt("private")),
        ];
        match source.origin {
            Origin::Campaign { .. } => {
                out.push(CurrentsEvent::campaign_enroll_in_control(id(), at, e, s));
                out.push(CurrentsEvent::campaign_conversion(
                    id(),
                    at,
                    e,
                    s,
                    1,
                    "{\"type\":\"purchase\"}",
                ));
            }
            Origin::Canvas { .. } => out.push(CurrentsEvent::canvas_conversion(
                id(),
                at,
                e,
                s,
                0,
                "{\"type\":\"purchase\"}",
            )),
            Origin::AdHoc => {}
        }
        out
    }

    fn keys(v: &Value, field: &str) -> Vec<String> {
        v[field].as_object().unwrap().keys().cloned().collect()
    }

    /// With a campaign origin and every input present: each type's `user` and `properties`
    /// keys, in order. Transcribed from `reference/currents-events.md` minus the fields the
    /// module doc says are never written.
    const FULL_CAMPAIGN: &[(EventType, &[&str], &[&str])] = &[
        (
            EventType::EmailSend,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "campaign_id",
                "campaign_name",
                "dispatch_id",
                "email_address",
                "message_extras",
                "message_variation_id",
                "message_variation_name",
                "send_id",
            ],
        ),
        (
            EventType::EmailDelivery,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "campaign_id",
                "campaign_name",
                "dispatch_id",
                "email_address",
                "esp",
                "from_domain",
                "message_variation_id",
                "message_variation_name",
                "send_id",
                "sending_ip",
            ],
        ),
        (
            EventType::EmailBounce,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "bounce_reason",
                "campaign_id",
                "campaign_name",
                "dispatch_id",
                "email_address",
                "is_drop",
                "message_variation_id",
                "message_variation_name",
                "send_id",
            ],
        ),
        (
            EventType::EmailSoftBounce,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "bounce_reason",
                "campaign_id",
                "campaign_name",
                "dispatch_id",
                "email_address",
                "message_variation_id",
                "message_variation_name",
                "send_id",
            ],
        ),
        (
            EventType::EmailDeferral,
            &["user_id", "external_user_id", "timezone"],
            &[
                "app_group_id",
                "attempt_count",
                "campaign_id",
                "campaign_name",
                "deferral_reason",
                "dispatch_id",
                "email_address",
                "message_variation_id",
                "message_variation_name",
                "recipient_domain",
                "send_id",
            ],
        ),
        (
            EventType::EmailAbort,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "abort_log",
                "abort_type",
                "app_group_id",
                "campaign_id",
                "campaign_name",
                "dispatch_id",
                "email_address",
                "message_variation_id",
                "message_variation_name",
                "send_id",
            ],
        ),
        (
            EventType::EmailOpen,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "browser",
                "campaign_id",
                "campaign_name",
                "device_class",
                "device_model",
                "device_os",
                "dispatch_id",
                "email_address",
                "is_amp",
                "machine_open",
                "mailbox_provider",
                "message_variation_id",
                "message_variation_name",
                "send_id",
                "user_agent",
            ],
        ),
        (
            EventType::EmailClick,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "browser",
                "campaign_id",
                "campaign_name",
                "device_class",
                "device_model",
                "device_os",
                "dispatch_id",
                "email_address",
                "is_amp",
                "is_suspected_bot_click",
                "link_id",
                "mailbox_provider",
                "message_variation_id",
                "message_variation_name",
                "send_id",
                "suspected_bot_click_reason",
                "url",
                "user_agent",
            ],
        ),
        (
            EventType::EmailUnsubscribe,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "campaign_id",
                "campaign_name",
                "dispatch_id",
                "email_address",
                "message_variation_id",
                "message_variation_name",
                "send_id",
            ],
        ),
        (
            EventType::SubscriptionGlobalStateChange,
            &["user_id", "external_user_id", "timezone"],
            &[
                "app_group_id",
                "app_id",
                "campaign_id",
                "campaign_name",
                "channel",
                "channel_identifier",
                "email_address",
                "message_variation_id",
                "message_variation_name",
                "send_id",
                "subscription_status",
            ],
        ),
        (
            EventType::WebhookSend,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "campaign_id",
                "campaign_name",
                "dispatch_id",
                "message_extras",
                "message_variation_id",
                "message_variation_name",
                "send_id",
            ],
        ),
        (
            EventType::WebhookFailure,
            &["user_id", "external_user_id"],
            &[
                "app_group_id",
                "campaign_id",
                "campaign_name",
                "content_length",
                "dispatch_id",
                "endpoint_url",
                "host",
                "http_status_code",
                "is_terminal",
                "message_variation_id",
                "message_variation_name",
                "raw_response",
                "retry_count",
                "send_id",
                "url_path",
                "webhook_duration",
                "webhook_failure_source",
            ],
        ),
        (
            EventType::WebhookRetry,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "campaign_id",
                "campaign_name",
                "dispatch_id",
                "message_variation_id",
                "message_variation_name",
                "retry_log",
                "retry_type",
                "send_id",
            ],
        ),
        (
            EventType::WebhookAbort,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "abort_log",
                "abort_type",
                "app_group_id",
                "campaign_id",
                "campaign_name",
                "dispatch_id",
                "message_variation_id",
                "message_variation_name",
                "send_id",
            ],
        ),
        (
            EventType::CampaignEnrollInControl,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "app_id",
                "campaign_id",
                "campaign_name",
                "dispatch_id",
                "message_variation_id",
                "message_variation_name",
                "send_id",
            ],
        ),
        (
            EventType::CampaignConversion,
            &["user_id", "external_user_id", "device_id", "timezone"],
            &[
                "app_group_id",
                "app_id",
                "campaign_id",
                "campaign_name",
                "conversion_behavior",
                "conversion_behavior_index",
                "dispatch_id",
                "message_variation_id",
                "message_variation_name",
                "send_id",
            ],
        ),
    ];

    const CAMPAIGN_KEYS: [&str; 4] = [
        "campaign_id",
        "campaign_name",
        "message_variation_id",
        "message_variation_name",
    ];

    const CANVAS_KEYS: [&str; 6] = [
        "canvas_id",
        "canvas_name",
        "canvas_step_id",
        "canvas_step_name",
        "canvas_variation_id",
        "canvas_variation_name",
    ];

    fn full_user<'a>(braze: &'a BrazeId, ext: &'a ExternalId, dev: &'a DeviceId) -> EventUser<'a> {
        EventUser {
            braze_id: braze,
            external_id: Some(ext),
            device_id: Some(dev),
            time_zone: Some("Europe/Paris"),
        }
    }

    fn expected(event_type: EventType) -> (&'static [&'static str], &'static [&'static str]) {
        FULL_CAMPAIGN
            .iter()
            .find(|(t, _, _)| *t == event_type)
            .map(|&(_, user, props)| (user, props))
            .unwrap_or_else(|| panic!("{event_type:?} has no row"))
    }

    #[test]
    fn each_type_has_exactly_its_reference_fields_in_order() {
        let braze = BrazeId::from_bytes([1; 12]);
        let ext = ExternalId::parse("u1").unwrap();
        let dev = DeviceId::parse("d1").unwrap();
        let user = full_user(&braze, &ext, &dev);
        let events = every_event(&user, &full_source(CAMPAIGN), true);
        assert_eq!(events.len(), FULL_CAMPAIGN.len());
        for event in &events {
            let body = event.body_value();
            let (user_keys, props) = expected(event.event_type);
            assert_eq!(body["event_type"], event.event_type.as_str());
            assert_eq!(body["id"], "e");
            assert_eq!(body["time"], 1_700_000_000);
            assert_eq!(event.time, 1_700_000_000);
            assert_eq!(keys(&body, "user"), user_keys, "{:?}", event.event_type);
            assert_eq!(keys(&body, "properties"), props, "{:?}", event.event_type);
            // The text is what serde_json prints for the parsed object (same escaping, same
            // order), as for the other events.
            assert_eq!(event.body, body.to_string());
        }
    }

    #[test]
    fn a_canvas_origin_writes_canvas_members_where_the_campaign_ones_were() {
        let braze = BrazeId::from_bytes([1; 12]);
        let ext = ExternalId::parse("u1").unwrap();
        let dev = DeviceId::parse("d1").unwrap();
        let user = full_user(&braze, &ext, &dev);
        for event in every_event(&user, &full_source(CANVAS), true) {
            let body = event.body_value();
            let props = keys(&body, "properties");
            if event.event_type == EventType::CanvasConversion {
                assert_eq!(
                    props,
                    [
                        "app_group_id",
                        "app_id",
                        "canvas_id",
                        "canvas_name",
                        "canvas_step_id",
                        "canvas_step_name",
                        "canvas_variation_id",
                        "canvas_variation_name",
                        "conversion_behavior",
                        "conversion_behavior_index",
                    ]
                );
                assert_eq!(body["properties"]["conversion_behavior_index"], 0);
                continue;
            }
            let (_, campaign_props) = expected(event.event_type);
            let mut want: Vec<String> = Vec::new();
            for k in campaign_props {
                match *k {
                    "campaign_id" => want.extend(CANVAS_KEYS.iter().map(|s| s.to_string())),
                    k if CAMPAIGN_KEYS.contains(&k) => {}
                    k => want.push(k.to_owned()),
                }
            }
            assert_eq!(props, want, "{:?}", event.event_type);
            let p = &body["properties"];
            assert_eq!(p["canvas_id"], "cnv");
            assert_eq!(p["canvas_variation_name"], "Path A");
            assert_eq!(p["canvas_step_name"], "Welcome");
            assert!(p.get("canvas_step_message_variation_id").is_none());
        }
    }

    #[test]
    fn an_adhoc_send_has_no_campaign_or_canvas_members() {
        let braze = BrazeId::from_bytes([1; 12]);
        let ext = ExternalId::parse("u1").unwrap();
        let dev = DeviceId::parse("d1").unwrap();
        let user = full_user(&braze, &ext, &dev);
        let events = every_event(&user, &full_source(Origin::AdHoc), true);
        assert_eq!(events.len(), FULL_CAMPAIGN.len() - 2);
        for event in events {
            let props = keys(&event.body_value(), "properties");
            let (_, campaign_props) = expected(event.event_type);
            let want: Vec<&str> = campaign_props
                .iter()
                .copied()
                .filter(|k| !CAMPAIGN_KEYS.contains(k))
                .collect();
            assert_eq!(props, want, "{:?}", event.event_type);
        }
    }

    #[test]
    fn campaign_members_carry_the_sources_values() {
        let braze = BrazeId::from_bytes([1; 12]);
        let ext = ExternalId::parse("u1").unwrap();
        let dev = DeviceId::parse("d1").unwrap();
        let user = full_user(&braze, &ext, &dev);
        for event in every_event(&user, &full_source(CAMPAIGN), true) {
            let body = event.body_value();
            let p = &body["properties"];
            assert_eq!(p["app_group_id"], "ag");
            assert_eq!(p["campaign_id"], "cmp");
            assert_eq!(p["campaign_name"], "Spring");
            assert_eq!(p["message_variation_id"], "var");
            assert_eq!(p["message_variation_name"], "Variant 1");
            assert_eq!(p["send_id"], "snd");
            if p.get("dispatch_id").is_some() {
                assert_eq!(p["dispatch_id"], "dsp");
            }
            assert_eq!(body["user"]["user_id"], braze.as_str());
            assert_eq!(body["user"]["external_user_id"], "u1");
        }
    }

    #[test]
    fn absent_inputs_are_omitted_never_null() {
        let braze = BrazeId::from_bytes([2; 12]);
        let user = EventUser {
            braze_id: &braze,
            external_id: None,
            device_id: None,
            time_zone: None,
        };
        let bare = Origin::Campaign {
            campaign_id: "cmp",
            campaign_name: None,
            message_variation_id: None,
            message_variation_name: None,
        };
        for event in every_event(&user, &bare_source(bare), false) {
            let body = event.body_value();
            assert_eq!(keys(&body, "user"), ["user_id"], "{:?}", event.event_type);
            let props = body["properties"].as_object().unwrap();
            for (k, v) in props {
                assert!(!v.is_null(), "{:?}: {k} is null", event.event_type);
            }
            for k in [
                "app_id",
                "campaign_name",
                "dispatch_id",
                "send_id",
                "message_variation_id",
                "message_variation_name",
                "abort_log",
                "message_extras",
                "esp",
                "from_domain",
                "sending_ip",
                "recipient_domain",
                "browser",
                "device_class",
                "device_model",
                "device_os",
                "mailbox_provider",
                "user_agent",
                "machine_open",
                "suspected_bot_click_reason",
                "http_status_code",
                "endpoint_url",
                "host",
                "url_path",
                "raw_response",
                "content_length",
                "webhook_duration",
            ] {
                assert!(!props.contains_key(k), "{:?}: {k}", event.event_type);
            }
            // Required members stay, whatever is missing.
            assert_eq!(props["app_group_id"], "ag");
            assert_eq!(props["campaign_id"], "cmp");
        }
    }

    #[test]
    fn a_person_opening_or_clicking_is_not_flagged_as_a_machine() {
        let braze = BrazeId::from_bytes([3; 12]);
        let user = EventUser {
            braze_id: &braze,
            external_id: None,
            device_id: None,
            time_zone: None,
        };
        let source = bare_source(Origin::AdHoc);
        let at = Millis(0);
        let id = || EventId("e".into());
        let person = UserAgentInfo {
            browser: Some("Firefox".into()),
            ..UserAgentInfo::default()
        };
        let open = CurrentsEvent::email_open(id(), at, &user, &source, "a@b.c", None, &person)
            .body_value();
        assert!(open["properties"].get("machine_open").is_none());
        assert_eq!(open["properties"]["is_amp"], false);
        assert_eq!(open["properties"]["browser"], "Firefox");
        let click = CurrentsEvent::email_click(
            id(),
            at,
            &user,
            &source,
            "a@b.c",
            "https://x/",
            "3",
            None,
            &person,
        )
        .body_value();
        assert_eq!(click["properties"]["is_suspected_bot_click"], false);
        assert!(
            click["properties"]
                .get("suspected_bot_click_reason")
                .is_none()
        );
        assert_eq!(click["properties"]["link_id"], "3");

        let machine = machine_agent();
        let open = CurrentsEvent::email_open(id(), at, &user, &source, "a@b.c", None, &machine)
            .body_value();
        assert_eq!(open["properties"]["machine_open"], "true");
        let click = CurrentsEvent::email_click(
            id(),
            at,
            &user,
            &source,
            "a@b.c",
            "https://x/",
            "0",
            None,
            &machine,
        )
        .body_value();
        assert_eq!(click["properties"]["is_suspected_bot_click"], true);
        assert_eq!(
            click["properties"]["suspected_bot_click_reason"],
            serde_json::json!(["user_agent"])
        );
    }

    #[test]
    fn webhook_failure_numbers_fit_the_32_bit_wire_fields() {
        let braze = BrazeId::from_bytes([4; 12]);
        let user = EventUser {
            braze_id: &braze,
            external_id: None,
            device_id: None,
            time_zone: Some("UTC"),
        };
        let failure = WebhookFailure {
            content_length: Some(i64::MAX),
            webhook_duration_ms: Some(5_000_000_000),
            is_terminal: true,
            retry_count: 4,
            ..full_failure()
        };
        let p = CurrentsEvent::webhook_failure(
            EventId("e".into()),
            Millis(0),
            &user,
            &bare_source(Origin::AdHoc),
            &failure,
        )
        .body_value()["properties"]
            .clone();
        assert_eq!(p["content_length"], i64::from(i32::MAX));
        assert_eq!(p["webhook_duration"], i64::from(i32::MAX));
        assert_eq!(p["http_status_code"], 503);
        assert_eq!(p["retry_count"], 4);
        assert_eq!(p["is_terminal"], true);
        assert_eq!(p["webhook_failure_source"], "External Endpoint");
    }

    #[test]
    fn awkward_strings_round_trip() {
        let braze = BrazeId::from_bytes([5; 12]);
        let user = EventUser {
            braze_id: &braze,
            external_id: None,
            device_id: None,
            time_zone: None,
        };
        let awkward = "q\" \\ \u{0}\u{1f} 🌊 \u{2028} </script>";
        let source = MessageSource {
            app_group_id: awkward,
            app_id: Some(awkward),
            origin: Origin::Campaign {
                campaign_id: awkward,
                campaign_name: Some(awkward),
                message_variation_id: Some(awkward),
                message_variation_name: Some(awkward),
            },
            dispatch_id: Some(awkward),
            send_id: Some(awkward),
        };
        let event = CurrentsEvent::email_abort(
            EventId(awkward.into()),
            Millis(0),
            &user,
            &source,
            awkward,
            awkward,
            Some(awkward),
        );
        let body = event.body_value();
        assert_eq!(event.body, body.to_string());
        for (k, v) in body["properties"].as_object().unwrap() {
            assert_eq!(v, awkward, "{k}");
        }
        assert_eq!(body["id"], awkward);
    }

    #[test]
    fn every_messaging_event_type_is_listed_with_its_category() {
        for t in EventType::ALL {
            let name = t.as_str();
            assert_eq!(EventType::parse(name), Some(t));
            let want = if name.starts_with("users.behaviors.") {
                crate::currents::EventCategory::CustomerBehavior
            } else if name.starts_with("users.messages.")
                || name.starts_with("users.campaigns.")
                || name.starts_with("users.canvas.")
                || name.starts_with("users.canvasstep.")
            {
                crate::currents::EventCategory::MessageEngagement
            } else {
                crate::currents::EventCategory::User
            };
            assert_eq!(t.category(), want, "{name}");
        }
    }
}
