//! Braze-flavoured Liquid (`braze-messaging.md` §7) on top of the `liquid` crate: a template
//! is parsed once when a campaign is saved or loaded ([`Template::parse`], [`check_all`]) and
//! rendered for each user at send time ([`Template::render`]) against that user's [`Vars`].
//!
//! The `liquid` crate speaks standard Liquid; what Braze adds is layered around it rather than
//! written as a second engine:
//!
//! - **`${name}` lookups.** Before parsing, the source is rewritten inside `{{ }}` and `{% %}`:
//!   `custom_attribute.${plan}` becomes `custom_attribute["plan"]` (names may contain spaces)
//!   and a leading `${first_name}` becomes a lookup in a hidden namespace holding the standard
//!   attributes and the subscription links. `${a.b}` reads the key `a.b`, or the nested path
//!   `a` → `b` when there is no such key.
//! - **Missing values are empty, never errors.** Liquid-rust refuses unknown variables; Braze
//!   renders them as nothing. Rendering therefore runs on our own [`Runtime`] whose lookups of
//!   unknown names give a missing value, over a value tree whose objects answer any missing
//!   key with a missing value that can itself be indexed, and that the array filters take as
//!   an empty array (Ruby Liquid lets `nil` through `join`, `first`, `map`, …). Loops over the
//!   message's data keep the leniency one level into their items (`{{ item.price }}` for an
//!   item without a price); a miss deeper under a loop item, a miss under the items of a loop
//!   over an `{% assign %}`ed value, and an index into a string under a loop item are still
//!   errors (a `template_parse_error` abort): those values are plain Liquid values again.
//! - **`{% abort_message("reason") %}`** is a custom tag: it records the reason in the
//!   runtime's registers and stops rendering, which [`Template::render`] reports as
//!   [`RenderError::Abort`] (the dispatcher's `liquid_abort_message`).
//! - **Braze filters** the stdlib lacks: `money`, `json_escape`, `sha2`, `base64_encode`,
//!   `hmac_sha256`, `hmac_sha256_base64`. The number filters (`plus`, `minus`, `times`,
//!   `divided_by`, `modulo`, `abs`, `round`, `ceil`, `floor`, `at_least`, `at_most`) are
//!   replaced by Ruby-Liquid versions: anything that is not a number counts as 0 (a missing
//!   attribute does not abort the send), integer division and modulo floor, and overflow turns
//!   into floating point (the stdlib's panic on overflow and on `i64::MIN / -1`). `date` also
//!   reads the ISO 8601 times profiles store (`2024-01-02T03:04:05Z`, `2024-01-02`). Not
//!   supported (a save-time error "Unknown filter"): `time_zone` (no time-zone database here),
//!   `md5`, `sha1`, `hmac_sha1`; nor partials (`include`, `render`) nor Connected Content.
//!
//! Limits, because templates are written through the API and data comes from any SDK: a
//! template is at most [`MAX_TEMPLATE_BYTES`], its output at most [`MAX_OUTPUT_BYTES`], blocks
//! nest at most [`MAX_BLOCK_DEPTH`] deep (the parser recurses), a `for` over a range runs at
//! most [`MAX_RANGE_STEPS`] times (the stdlib materialises ranges, so `(1..n)` with a huge `n`
//! from a profile would exhaust memory: ranges with a variable bound are clamped, literal ones
//! that are too long are refused at save time), a render goes through at most
//! [`MAX_RENDER_STEPS`] elements and loop iterations (nested loops multiply) and no assigned or
//! captured value grows past [`MAX_OUTPUT_BYTES`] (doubling a string in a loop would). Parsing
//! and rendering never panic: the engine runs under `catch_unwind` as a last line of defence.

use std::borrow::Cow;
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, LazyLock, Mutex};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use liquid_core::model::{
    ArrayView, DateTime, DisplayCow, KString, KStringCow, KStringRef, ObjectView, Scalar,
    ScalarCow, State, Value, ValueCow, ValueView,
};
use liquid_core::parser::{FilterArguments, ParameterReflection};
use liquid_core::partials::{InMemorySource, PartialCompiler, PartialSource};
use liquid_core::runtime::{
    Expression, Interrupt, InterruptRegister, PartialStore, Registers, Renderable, Runtime,
};
use liquid_core::{
    Error as LiquidError, Filter, FilterReflection, Language, ParseFilter, ParseTag, TagReflection,
    TagTokenIter,
};
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};

/// The largest template source accepted (an HTML email body is the big one).
pub const MAX_TEMPLATE_BYTES: usize = 1024 * 1024;
/// The largest rendered output; rendering past it fails rather than filling memory.
pub const MAX_OUTPUT_BYTES: usize = 4 * 1024 * 1024;
/// How deep blocks (`if`, `for`, `case`, `capture`, …) may nest: the parser recurses per level.
pub const MAX_BLOCK_DEPTH: usize = 32;
/// How deep brackets may nest inside one `{{ }}` or `{% %}` (the grammar recurses too).
pub const MAX_EXPRESSION_DEPTH: usize = 16;
/// The most steps a `for` over a range (`(1..n)`) takes.
pub const MAX_RANGE_STEPS: i64 = 10_000;
/// The most elements and loop iterations one render goes through (nested loops multiply).
pub const MAX_RENDER_STEPS: u64 = 1_000_000;
/// Braze's cap on an `abort_message` reason (`abort_log`), in characters.
pub const MAX_ABORT_LOG_CHARS: usize = 128;

/// The reason logged by `{% abort_message %}` / `{% abort_message() %}` without one.
const DEFAULT_ABORT_LOG: &str = "{% abort_message %} called";

/// The hidden top-level namespace `${name}` resolves in: standard attributes and links.
const STANDARD_ROOT: &str = "__braze";

/// Everything one user's message may reference, in Braze's namespaces. Every map is a plain
/// JSON object; a name that is absent renders as nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Vars {
    /// Standard attributes under their Liquid names (`first_name`, `email_address`,
    /// `user_id`, …): `{{${first_name}}}`.
    pub standard: Map<String, Json>,
    /// `{{custom_attribute.${plan}}}`.
    pub custom_attribute: Map<String, Json>,
    /// The triggering event's properties: `{{event_properties.${x}}}`.
    pub event_properties: Map<String, Json>,
    /// An API trigger's `trigger_properties`: `{{api_trigger_properties.${x}}}`.
    pub api_trigger_properties: Map<String, Json>,
    /// A Canvas entry's properties, under both `canvas_entry_properties` and `context`.
    pub canvas_entry_properties: Map<String, Json>,
    /// `{{campaign.${api_id}}}`, `${name}`, `${dispatch_id}`, `${message_name}`, …
    pub campaign: Map<String, Json>,
    /// `{{canvas.${name}}}`, `${api_id}`, `${variant_name}`, …
    pub canvas: Map<String, Json>,
    /// Top-level links beside the standard attributes: `{{${set_user_to_unsubscribed_url}}}`.
    pub links: Map<String, Json>,
}

/// A template that does not parse, with a message meant for the person who wrote it
/// (line and column refer to their source, not to our rewriting of it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    pub message: String,
}

/// Why a parsed template produced no message for this user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// `{% abort_message %}` ran: not a send, not an error (`liquid_abort_message`).
    #[error("aborted by abort_message: {log}")]
    Abort { log: String },
    /// The template failed on this user's data (`template_parse_error`).
    #[error("{message}")]
    Failed { message: String },
}

/// One of a definition's templates that does not parse: `path` names its place (e.g.
/// `messages[0].body`) so the API can answer 400 pointing at the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct InvalidTemplate {
    pub path: String,
    pub message: String,
}

/// Parses every `(path, source)`; the first that does not parse is the error. Used when a
/// campaign or an ad-hoc message is accepted, so a broken template is refused up front instead
/// of aborting every send.
pub fn check_all<'a, I>(templates: I) -> Result<(), InvalidTemplate>
where
    I: IntoIterator<Item = (String, &'a str)>,
{
    for (path, source) in templates {
        if let Err(e) = Template::parse(source) {
            return Err(InvalidTemplate {
                path,
                message: e.message,
            });
        }
    }
    Ok(())
}

/// A parsed template, cheap to render many times and shareable across threads.
pub struct Template {
    inner: liquid_core::Template,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Template").finish_non_exhaustive()
    }
}

impl Template {
    /// Parses Braze-flavoured Liquid.
    pub fn parse(source: &str) -> Result<Template, ParseError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(ParseError {
                message: format!(
                    "the template is {} bytes; at most {MAX_TEMPLATE_BYTES} are accepted",
                    source.len()
                ),
            });
        }
        match catch_unwind(|| parse_unguarded(source)) {
            Ok(result) => result,
            Err(_) => Err(ParseError {
                message: "the template engine could not parse this template".into(),
            }),
        }
    }

    /// Renders for one user. Unknown and missing values render as nothing.
    pub fn render(&self, vars: &Vars) -> Result<String, RenderError> {
        match catch_unwind(AssertUnwindSafe(|| self.render_unguarded(vars))) {
            Ok(result) => result,
            Err(_) => Err(RenderError::Failed {
                message: "the template engine failed on this template".into(),
            }),
        }
    }

    fn render_unguarded(&self, vars: &Vars) -> Result<String, RenderError> {
        let scope = Scope::new(vars);
        let mut out = CappedWriter::default();
        let result = self.inner.render_to(&mut out, &scope);
        if let Some(log) = scope.registers.get_mut::<AbortRegister>().0.take() {
            return Err(RenderError::Abort { log });
        }
        if let Some(why) = scope.stopped.get() {
            return Err(RenderError::Failed {
                message: why.to_owned(),
            });
        }
        match result {
            Ok(()) => String::from_utf8(out.buf).map_err(|_| RenderError::Failed {
                message: "the rendered output is not UTF-8".into(),
            }),
            Err(_) if out.exceeded => Err(RenderError::Failed {
                message: format!("the rendered output is over {MAX_OUTPUT_BYTES} bytes"),
            }),
            Err(e) => Err(RenderError::Failed {
                message: describe_render_error(&e),
            }),
        }
    }
}

fn parse_unguarded(source: &str) -> Result<Template, ParseError> {
    let rewritten = preprocess(source)?;
    match liquid_core::parser::parse(&rewritten.text, language()) {
        Ok(elements) => Ok(Template {
            inner: liquid_core::Template::new(elements),
        }),
        Err(e) => Err(ParseError {
            message: describe_parse_error(&e, &rewritten, source),
        }),
    }
}

// -- the language -----------------------------------------------------------------------------

/// The stdlib plus our tag and filters, built once (building registers some 80 plugins).
fn language() -> &'static Language {
    static LANGUAGE: LazyLock<Arc<Language>> = LazyLock::new(build_language);
    &LANGUAGE
}

/// `liquid::ParserBuilder` assembles the stdlib but keeps the resulting `Language` private;
/// the one public door to it is the partial compiler, which the builder hands the language to
/// compile partials with. This compiler keeps it (and compiles no partials), so we can parse
/// with `liquid_core` and render on our own [`Runtime`].
struct CaptureLanguage {
    slot: Arc<Mutex<Option<Arc<Language>>>>,
    source: InMemorySource,
}

impl PartialCompiler for CaptureLanguage {
    fn compile(
        self,
        language: Arc<Language>,
    ) -> liquid_core::Result<Box<dyn PartialStore + Send + Sync>> {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some(language);
        }
        Ok(Box::new(NoPartials))
    }

    fn source(&self) -> &dyn PartialSource {
        &self.source
    }
}

fn build_language() -> Arc<Language> {
    let slot = Arc::new(Mutex::new(None));
    let mut builder = liquid::ParserBuilder::with_stdlib().tag(AbortMessageTag);
    for kind in FilterKind::ALL {
        builder = builder.filter(BrazeFilter(kind));
    }
    let built = builder
        .partials(CaptureLanguage {
            slot: slot.clone(),
            source: InMemorySource::new(),
        })
        .build();
    let captured = slot.lock().ok().and_then(|mut s| s.take());
    match (built, captured) {
        (Ok(_), Some(language)) => language,
        // Only a programming error here (a plugin registered twice is not one); fail loudly
        // in every parse rather than parse with half a language.
        _ => panic!("cannot assemble the Liquid language"),
    }
}

/// Partials (`{% include %}`, `{% render %}`) are not part of Braze's Liquid.
#[derive(Debug)]
struct NoPartials;

impl PartialStore for NoPartials {
    fn contains(&self, _name: &str) -> bool {
        false
    }

    fn names(&self) -> Vec<&str> {
        Vec::new()
    }

    fn try_get(&self, _name: &str) -> Option<Arc<dyn Renderable>> {
        None
    }

    fn get(&self, name: &str) -> liquid_core::Result<Arc<dyn Renderable>> {
        Err(
            LiquidError::with_msg("partials ({% include %}, {% render %}) are not supported")
                .context("partial", name.to_owned()),
        )
    }
}

// -- abort_message ----------------------------------------------------------------------------

/// Set by `{% abort_message %}`; read by [`Template::render`] after rendering stops.
#[derive(Default)]
struct AbortRegister(Option<String>);

#[derive(Clone, Copy)]
struct AbortMessageTag;

impl TagReflection for AbortMessageTag {
    fn tag(&self) -> &str {
        "abort_message"
    }

    fn description(&self) -> &str {
        "Stops this user's message: it is not sent and the reason is logged (Braze)."
    }
}

impl ParseTag for AbortMessageTag {
    fn parse(
        &self,
        mut arguments: TagTokenIter<'_>,
        _options: &Language,
    ) -> liquid_core::Result<Box<dyn Renderable>> {
        let reason = match arguments.next() {
            Some(token) => Some(token.expect_value().into_result()?),
            None => None,
        };
        arguments.expect_nothing()?;
        Ok(Box::new(AbortMessage { reason }))
    }

    fn reflection(&self) -> &dyn TagReflection {
        self
    }
}

#[derive(Debug)]
struct AbortMessage {
    reason: Option<Expression>,
}

impl Renderable for AbortMessage {
    fn render_to(&self, _writer: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        let reason = match &self.reason {
            Some(expression) => expression.evaluate(runtime)?.to_kstr().to_string(),
            None => String::new(),
        };
        let log = if reason.is_empty() {
            DEFAULT_ABORT_LOG.to_owned()
        } else {
            reason.chars().take(MAX_ABORT_LOG_CHARS).collect()
        };
        runtime.registers().get_mut::<AbortRegister>().0 = Some(log);
        Err(LiquidError::with_msg("abort_message"))
    }
}

// -- filters ----------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FilterKind {
    Plus,
    Minus,
    Times,
    DividedBy,
    Modulo,
    Abs,
    Round,
    Ceil,
    Floor,
    AtLeast,
    AtMost,
    Date,
    Money,
    JsonEscape,
    Sha2,
    Base64Encode,
    HmacSha256,
    HmacSha256Base64,
}

impl FilterKind {
    const ALL: [FilterKind; 18] = [
        FilterKind::Plus,
        FilterKind::Minus,
        FilterKind::Times,
        FilterKind::DividedBy,
        FilterKind::Modulo,
        FilterKind::Abs,
        FilterKind::Round,
        FilterKind::Ceil,
        FilterKind::Floor,
        FilterKind::AtLeast,
        FilterKind::AtMost,
        FilterKind::Date,
        FilterKind::Money,
        FilterKind::JsonEscape,
        FilterKind::Sha2,
        FilterKind::Base64Encode,
        FilterKind::HmacSha256,
        FilterKind::HmacSha256Base64,
    ];

    fn name(self) -> &'static str {
        match self {
            FilterKind::Plus => "plus",
            FilterKind::Minus => "minus",
            FilterKind::Times => "times",
            FilterKind::DividedBy => "divided_by",
            FilterKind::Modulo => "modulo",
            FilterKind::Abs => "abs",
            FilterKind::Round => "round",
            FilterKind::Ceil => "ceil",
            FilterKind::Floor => "floor",
            FilterKind::AtLeast => "at_least",
            FilterKind::AtMost => "at_most",
            FilterKind::Date => "date",
            FilterKind::Money => "money",
            FilterKind::JsonEscape => "json_escape",
            FilterKind::Sha2 => "sha2",
            FilterKind::Base64Encode => "base64_encode",
            FilterKind::HmacSha256 => "hmac_sha256",
            FilterKind::HmacSha256Base64 => "hmac_sha256_base64",
        }
    }

    /// How many positional arguments it takes: at least, at most.
    fn arity(self) -> (usize, usize) {
        match self {
            FilterKind::Plus
            | FilterKind::Minus
            | FilterKind::Times
            | FilterKind::DividedBy
            | FilterKind::Modulo
            | FilterKind::AtLeast
            | FilterKind::AtMost
            | FilterKind::Date
            | FilterKind::HmacSha256
            | FilterKind::HmacSha256Base64 => (1, 1),
            FilterKind::Round => (0, 1),
            FilterKind::Abs
            | FilterKind::Ceil
            | FilterKind::Floor
            | FilterKind::Money
            | FilterKind::JsonEscape
            | FilterKind::Sha2
            | FilterKind::Base64Encode => (0, 0),
        }
    }
}

/// The parser side of our filters (one type for all, told apart by kind).
#[derive(Clone, Copy, Debug)]
struct BrazeFilter(FilterKind);

impl FilterReflection for BrazeFilter {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn description(&self) -> &str {
        "Braze-compatible filter"
    }

    fn positional_parameters(&self) -> &'static [ParameterReflection] {
        &[]
    }

    fn keyword_parameters(&self) -> &'static [ParameterReflection] {
        &[]
    }
}

impl ParseFilter for BrazeFilter {
    fn parse(&self, arguments: FilterArguments<'_>) -> liquid_core::Result<Box<dyn Filter>> {
        let FilterArguments {
            positional,
            mut keyword,
        } = arguments;
        if let Some((name, _)) = keyword.next() {
            return Err(LiquidError::with_msg(format!(
                "{} takes no keyword argument `{name}`",
                self.0.name()
            )));
        }
        let args: Vec<Expression> = positional.collect();
        let (least, most) = self.0.arity();
        if args.len() < least || args.len() > most {
            let takes = if least == most {
                least.to_string()
            } else {
                format!("{least} to {most}")
            };
            return Err(LiquidError::with_msg(format!(
                "{} takes {takes} argument(s), not {}",
                self.0.name(),
                args.len()
            )));
        }
        Ok(Box::new(AppliedFilter { kind: self.0, args }))
    }

    fn reflection(&self) -> &dyn FilterReflection {
        self
    }
}

#[derive(Debug)]
struct AppliedFilter {
    kind: FilterKind,
    args: Vec<Expression>,
}

impl fmt::Display for AppliedFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.name())?;
        for (i, arg) in self.args.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { ", " })?;
            write!(f, "{arg}")?;
        }
        Ok(())
    }
}

/// A number as Ruby Liquid sees one: an integer or a float; anything else is 0.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    fn of(value: &dyn ValueView) -> Number {
        match value.as_scalar() {
            Some(s) => match (s.to_integer(), s.to_float()) {
                (Some(i), _) => Number::Int(i),
                (None, Some(f)) => Number::Float(f),
                _ => s
                    .to_kstr()
                    .trim()
                    .parse::<f64>()
                    .map_or(Number::Int(0), Number::Float),
            },
            None => Number::Int(0),
        }
    }

    fn float(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }

    fn value(self) -> Value {
        match self {
            Number::Int(i) => Value::scalar(i),
            Number::Float(f) => Value::scalar(f),
        }
    }
}

fn arithmetic(kind: FilterKind, a: Number, b: Number) -> liquid_core::Result<Number> {
    let divide_by_zero = || LiquidError::with_msg("divided by 0");
    if let (Number::Int(x), Number::Int(y)) = (a, b) {
        let exact = match kind {
            FilterKind::Plus => x.checked_add(y),
            FilterKind::Minus => x.checked_sub(y),
            FilterKind::Times => x.checked_mul(y),
            FilterKind::DividedBy | FilterKind::Modulo if y == 0 => return Err(divide_by_zero()),
            // Ruby's integer division and modulo floor (the sign follows the divisor).
            FilterKind::DividedBy => x.checked_div(y).map(|q| {
                if x % y != 0 && ((x < 0) != (y < 0)) {
                    q - 1
                } else {
                    q
                }
            }),
            FilterKind::Modulo => x.checked_rem(y).map(|r| {
                if r != 0 && ((r < 0) != (y < 0)) {
                    r + y
                } else {
                    r
                }
            }),
            _ => None,
        };
        if let Some(n) = exact {
            return Ok(Number::Int(n));
        }
    }
    let (x, y) = (a.float(), b.float());
    Ok(Number::Float(match kind {
        FilterKind::Plus => x + y,
        FilterKind::Minus => x - y,
        FilterKind::Times => x * y,
        FilterKind::DividedBy | FilterKind::Modulo if y == 0.0 => return Err(divide_by_zero()),
        FilterKind::DividedBy => x / y,
        FilterKind::Modulo => x - y * (x / y).floor(),
        _ => return Err(LiquidError::with_msg("not an arithmetic filter")),
    }))
}

/// A date the `date` filter understands: Liquid's own formats (`now`, Unix timestamps,
/// `2024-01-02 03:04:05 +0000`, …) and the ISO 8601 that profiles store (`2024-01-02T03:04:05Z`,
/// `2024-01-02`).
fn date_time(input: &ScalarCow<'_>) -> Option<DateTime> {
    use time::format_description::well_known::Rfc3339;
    use time::macros::format_description;
    if let Some(at) = input.to_date_time() {
        return Some(at);
    }
    let text = input.to_kstr();
    let text = text.trim();
    if let Some(at) = DateTime::from_str(text) {
        return Some(at);
    }
    let at = time::OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .or_else(|| {
            time::Date::parse(text, format_description!("[year]-[month]-[day]"))
                .ok()
                .map(|d| d.midnight().assume_utc())
        })?;
    // liquid's DateTime has no constructor from `time`; it reads this format of its own.
    let liquid_format = format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second] [offset_hour sign:mandatory][offset_minute]"
    );
    DateTime::from_str(&at.format(liquid_format).ok()?)
}

fn hmac_sha256(key: &str, message: &str) -> Vec<u8> {
    match Hmac::<Sha256>::new_from_slice(key.as_bytes()) {
        Ok(mut mac) => {
            mac.update(message.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC takes keys of any length; this arm is never taken.
        Err(_) => Vec::new(),
    }
}

impl AppliedFilter {
    fn arg<'s>(&'s self, i: usize, runtime: &'s dyn Runtime) -> liquid_core::Result<ValueCow<'s>> {
        match self.args.get(i) {
            Some(e) => e.evaluate(runtime),
            None => Ok(ValueCow::Owned(Value::Nil)),
        }
    }
}

impl Filter for AppliedFilter {
    fn evaluate(&self, input: &dyn ValueView, runtime: &dyn Runtime) -> liquid_core::Result<Value> {
        let arg = |i: usize| self.arg(i, runtime);
        let text = || input.to_kstr().to_string();
        Ok(match self.kind {
            FilterKind::Plus
            | FilterKind::Minus
            | FilterKind::Times
            | FilterKind::DividedBy
            | FilterKind::Modulo => {
                let operand = arg(0)?;
                arithmetic(self.kind, Number::of(input), Number::of(operand.as_view()))?.value()
            }
            FilterKind::Round => {
                let digits = match Number::of(arg(0)?.as_view()) {
                    Number::Int(d) => d.clamp(0, 15) as i32,
                    Number::Float(d) => d.clamp(0.0, 15.0) as i32,
                };
                match Number::of(input) {
                    Number::Int(i) => Value::scalar(i),
                    Number::Float(f) if digits == 0 => Value::scalar(f.round() as i64),
                    Number::Float(f) => {
                        let scale = 10f64.powi(digits);
                        Value::scalar((f * scale).round() / scale)
                    }
                }
            }
            FilterKind::Ceil | FilterKind::Floor => match Number::of(input) {
                Number::Int(i) => Value::scalar(i),
                Number::Float(f) if self.kind == FilterKind::Ceil => Value::scalar(f.ceil() as i64),
                Number::Float(f) => Value::scalar(f.floor() as i64),
            },
            FilterKind::AtLeast | FilterKind::AtMost => {
                let bound = arg(0)?;
                let at_least = self.kind == FilterKind::AtLeast;
                match (Number::of(input), Number::of(bound.as_view())) {
                    (Number::Int(x), Number::Int(y)) => {
                        Value::scalar(if at_least { x.max(y) } else { x.min(y) })
                    }
                    (x, y) => {
                        let (x, y) = (x.float(), y.float());
                        Value::scalar(if at_least { x.max(y) } else { x.min(y) })
                    }
                }
            }
            FilterKind::Date => {
                let format = arg(0)?.to_kstr().to_string();
                match input.as_scalar().and_then(|s| date_time(&s)) {
                    Some(at) if !format.is_empty() => {
                        Value::scalar(at.format(&format).map_err(|_| {
                            LiquidError::with_msg(format!("invalid date format {format:?}"))
                        })?)
                    }
                    _ => input.to_value(),
                }
            }
            FilterKind::Abs => match Number::of(input) {
                Number::Int(i) => i
                    .checked_abs()
                    .map_or(Number::Float((i as f64).abs()), Number::Int)
                    .value(),
                Number::Float(f) => Value::scalar(f.abs()),
            },
            FilterKind::Money => Value::scalar(format!("{:.2}", Number::of(input).float())),
            FilterKind::JsonEscape => {
                let quoted = Json::String(text()).to_string();
                Value::scalar(quoted[1..quoted.len() - 1].to_owned())
            }
            FilterKind::Sha2 => Value::scalar(hex::encode(Sha256::digest(text().as_bytes()))),
            FilterKind::Base64Encode => {
                Value::scalar(base64::engine::general_purpose::STANDARD.encode(text()))
            }
            FilterKind::HmacSha256 => {
                let key = arg(0)?.to_kstr().to_string();
                Value::scalar(hex::encode(hmac_sha256(&key, &text())))
            }
            FilterKind::HmacSha256Base64 => {
                let key = arg(0)?.to_kstr().to_string();
                Value::scalar(
                    base64::engine::general_purpose::STANDARD.encode(hmac_sha256(&key, &text())),
                )
            }
        })
    }
}

// -- the lenient value tree ------------------------------------------------------------------

/// A message's data as Liquid sees it: like `liquid::model::Value`, except that objects answer
/// a missing key with [`MISSING`], so `custom_attribute.${address}.city` is empty when the
/// user has no address instead of an error.
#[derive(Debug)]
enum Node {
    Missing,
    Scalar(Scalar),
    Array(Vec<Node>),
    Object(Obj),
}

impl Node {
    fn from_json(value: &Json) -> Node {
        match value {
            Json::Null => Node::Missing,
            Json::Bool(b) => Node::Scalar(Scalar::new(*b)),
            Json::Number(n) => match n.as_i64() {
                Some(i) => Node::Scalar(Scalar::new(i)),
                None => Node::Scalar(Scalar::new(n.as_f64().unwrap_or(0.0))),
            },
            Json::String(s) => Node::Scalar(Scalar::new(s.clone())),
            Json::Array(items) => Node::Array(items.iter().map(Node::from_json).collect()),
            Json::Object(map) => Node::Object(Obj::from_maps(&[map])),
        }
    }

    fn view(&self) -> &dyn ValueView {
        match self {
            Node::Missing => &MISSING,
            Node::Scalar(s) => s,
            Node::Array(a) => a,
            Node::Object(o) => o,
        }
    }
}

impl ValueView for Node {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        self.view().render()
    }
    fn source(&self) -> DisplayCow<'_> {
        self.view().source()
    }
    fn type_name(&self) -> &'static str {
        self.view().type_name()
    }
    fn query_state(&self, state: State) -> bool {
        self.view().query_state(state)
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        self.view().to_kstr()
    }
    fn to_value(&self) -> Value {
        self.view().to_value()
    }
    fn as_scalar(&self) -> Option<ScalarCow<'_>> {
        self.view().as_scalar()
    }
    fn as_array(&self) -> Option<&dyn ArrayView> {
        self.view().as_array()
    }
    fn as_object(&self) -> Option<&dyn ObjectView> {
        self.view().as_object()
    }
    fn as_state(&self) -> Option<State> {
        self.view().as_state()
    }
    fn is_nil(&self) -> bool {
        self.view().is_nil()
    }
}

/// An object of the message's data; see [`Obj::get`] for what makes it lenient.
#[derive(Debug)]
struct Obj(BTreeMap<KString, Node>);

impl Obj {
    /// One object from several maps, later ones winning.
    fn from_maps(maps: &[&Map<String, Json>]) -> Obj {
        let mut out = BTreeMap::new();
        for map in maps {
            for (k, v) in *map {
                out.insert(KString::from_ref(k), Node::from_json(v));
            }
        }
        Obj(out)
    }

    /// `a.b.c` as a path when there is no key `a.b.c` (Braze's `${a.b}`).
    fn dotted(&self, key: &str) -> Option<&Node> {
        let mut parts = key.split('.');
        let mut node = self.0.get(parts.next()?)?;
        for part in parts {
            node = match node {
                Node::Object(o) => o.0.get(part)?,
                Node::Array(items) => items.as_slice().get(part.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(node)
    }
}

impl ValueView for Obj {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        self.0.render()
    }
    fn source(&self) -> DisplayCow<'_> {
        self.0.source()
    }
    fn type_name(&self) -> &'static str {
        "object"
    }
    fn query_state(&self, state: State) -> bool {
        self.0.query_state(state)
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        self.0.to_kstr()
    }
    fn to_value(&self) -> Value {
        self.0.to_value()
    }
    fn as_object(&self) -> Option<&dyn ObjectView> {
        Some(self)
    }
}

impl ObjectView for Obj {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        self.0.len() as i64
    }
    fn keys<'k>(&'k self) -> Box<dyn Iterator<Item = KStringCow<'k>> + 'k> {
        ObjectView::keys(&self.0)
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        ObjectView::values(&self.0)
    }
    fn iter<'k>(&'k self) -> Box<dyn Iterator<Item = (KStringCow<'k>, &'k dyn ValueView)> + 'k> {
        ObjectView::iter(&self.0)
    }
    fn contains_key(&self, index: &str) -> bool {
        self.0.contains_key(index)
    }
    /// A missing key is [`MISSING`] rather than `None` (which Liquid turns into an error),
    /// except `size`, which Liquid then answers with the number of keys.
    fn get<'s>(&'s self, index: &str) -> Option<&'s dyn ValueView> {
        if let Some(node) = self.0.get(index) {
            return Some(node);
        }
        if let Some(node) = index.contains('.').then(|| self.dotted(index)).flatten() {
            return Some(node);
        }
        if index == "size" {
            None
        } else {
            Some(&MISSING)
        }
    }
}

/// A missing value: `nil` to every test and filter, yet indexable (every key is missing
/// again), so a path through something absent is empty rather than an error; and an empty
/// array to the array filters (`join`, `first`, `map`, …), which Ruby Liquid lets through on
/// `nil` and Liquid-rust refuses. (Liquid's own path walk, used for loop items, tries the
/// array view first, so there only the first missing step is lenient.)
#[derive(Debug, Clone, Copy)]
struct Missing;

static MISSING: Missing = Missing;

impl ValueView for Missing {
    fn as_debug(&self) -> &dyn fmt::Debug {
        self
    }
    fn render(&self) -> DisplayCow<'_> {
        DisplayCow::Borrowed(&"")
    }
    fn source(&self) -> DisplayCow<'_> {
        DisplayCow::Borrowed(&"nil")
    }
    fn type_name(&self) -> &'static str {
        "nil"
    }
    fn query_state(&self, state: State) -> bool {
        Value::Nil.query_state(state)
    }
    fn to_kstr(&self) -> KStringCow<'_> {
        KStringCow::from_static("")
    }
    fn to_value(&self) -> Value {
        Value::Nil
    }
    fn as_object(&self) -> Option<&dyn ObjectView> {
        Some(self)
    }
    fn as_array(&self) -> Option<&dyn ArrayView> {
        Some(self)
    }
    fn is_nil(&self) -> bool {
        true
    }
}

impl ArrayView for Missing {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        0
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        Box::new(std::iter::empty())
    }
    fn contains_key(&self, _index: i64) -> bool {
        false
    }
    fn get(&self, _index: i64) -> Option<&dyn ValueView> {
        None
    }
}

impl ObjectView for Missing {
    fn as_value(&self) -> &dyn ValueView {
        self
    }
    fn size(&self) -> i64 {
        0
    }
    fn keys<'k>(&'k self) -> Box<dyn Iterator<Item = KStringCow<'k>> + 'k> {
        Box::new(std::iter::empty())
    }
    fn values<'k>(&'k self) -> Box<dyn Iterator<Item = &'k dyn ValueView> + 'k> {
        Box::new(std::iter::empty())
    }
    fn iter<'k>(&'k self) -> Box<dyn Iterator<Item = (KStringCow<'k>, &'k dyn ValueView)> + 'k> {
        Box::new(std::iter::empty())
    }
    fn contains_key(&self, _index: &str) -> bool {
        false
    }
    fn get<'s>(&'s self, index: &str) -> Option<&'s dyn ValueView> {
        if index == "size" {
            None
        } else {
            Some(&MISSING)
        }
    }
}

// -- the runtime ------------------------------------------------------------------------------

/// The top-level names a template can read, in the order of [`Root::cells`]. `context` is
/// `canvas_entry_properties` under Braze's other name.
const NAMESPACES: [&str; 7] = [
    STANDARD_ROOT,
    "custom_attribute",
    "event_properties",
    "api_trigger_properties",
    "canvas_entry_properties",
    "campaign",
    "canvas",
];

/// The user's namespaces, each converted to a [`Node`] the first time a template reads it
/// (a webhook URL without variables converts nothing).
struct Root<'v> {
    vars: &'v Vars,
    cells: [OnceCell<Node>; 7],
}

impl<'v> Root<'v> {
    fn new(vars: &'v Vars) -> Self {
        Root {
            vars,
            cells: Default::default(),
        }
    }

    fn namespace(&self, name: &str) -> Option<&Node> {
        let name = if name == "context" {
            "canvas_entry_properties"
        } else {
            name
        };
        let slot = NAMESPACES.iter().position(|n| *n == name)?;
        let v = self.vars;
        Some(self.cells[slot].get_or_init(|| {
            let maps: &[&Map<String, Json>] = match slot {
                0 => &[&v.standard, &v.links],
                1 => &[&v.custom_attribute],
                2 => &[&v.event_properties],
                3 => &[&v.api_trigger_properties],
                4 => &[&v.canvas_entry_properties],
                5 => &[&v.campaign],
                _ => &[&v.canvas],
            };
            Node::Object(Obj::from_maps(maps))
        }))
    }
}

/// The bottom of the runtime stack during a render: the user's namespaces, `assign`ed and
/// `capture`d variables, `increment` counters, and the registers (where `abort_message` and
/// `break`/`continue` leave their marks). Unlike Liquid's own, a lookup of anything unknown is
/// missing, not an error; loops and other blocks stack their frames on top of it.
///
/// It also meters the render: every element of a block and every loop iteration asks for the
/// registers (to see whether `break` was hit), so that is where steps are counted. Past the
/// budget, or when an assigned value grows too big, it raises `break` on every request, which
/// unwinds all blocks and loops at once, and the render is reported as failed.
struct Scope<'v> {
    root: Root<'v>,
    assigned: RefCell<HashMap<KString, Value>>,
    counters: RefCell<HashMap<KString, Value>>,
    registers: Registers,
    steps: Cell<u64>,
    stopped: Cell<Option<&'static str>>,
}

impl<'v> Scope<'v> {
    fn new(vars: &'v Vars) -> Self {
        Scope {
            root: Root::new(vars),
            assigned: RefCell::default(),
            counters: RefCell::default(),
            registers: Registers::default(),
            steps: Cell::new(0),
            stopped: Cell::new(None),
        }
    }

    /// Ends the render as soon as possible; `why` becomes its error.
    fn stop(&self, why: &'static str) {
        if self.stopped.get().is_none() {
            self.stopped.set(Some(why));
        }
        self.registers
            .get_mut::<InterruptRegister>()
            .set(Interrupt::Break);
    }
}

/// Roughly how many bytes a value holds, counting no further than `limit`.
fn value_size(value: &dyn ValueView, limit: usize) -> usize {
    if let Some(s) = value.as_scalar() {
        return s.to_kstr().len();
    }
    let mut total = 0;
    if let Some(array) = value.as_array() {
        for item in array.values() {
            total += 8 + value_size(item, limit.saturating_sub(total));
            if total > limit {
                break;
            }
        }
    } else if let Some(object) = value.as_object() {
        for (key, item) in object.iter() {
            total += key.len() + value_size(item, limit.saturating_sub(total));
            if total > limit {
                break;
            }
        }
    }
    total
}

/// One step of a path, as Liquid takes it (`first`, `last`, `size` included); `None` when the
/// step leads nowhere.
fn step<'a>(value: &'a dyn ValueView, index: &ScalarCow<'_>) -> Option<ValueCow<'a>> {
    if let Some(array) = value.as_array() {
        if let Some(i) = index.to_integer() {
            return array.get(i).map(ValueCow::Borrowed);
        }
        return match index.to_kstr().as_str() {
            "first" => array.first().map(ValueCow::Borrowed),
            "last" => array.last().map(ValueCow::Borrowed),
            "size" => Some(ValueCow::Owned(Value::scalar(array.size()))),
            _ => None,
        };
    }
    if let Some(object) = value.as_object() {
        let key = index.to_kstr();
        return match object.get(key.as_str()) {
            Some(v) => Some(ValueCow::Borrowed(v)),
            None if key.as_str() == "size" => Some(ValueCow::Owned(Value::scalar(object.size()))),
            None => None,
        };
    }
    match value.as_scalar() {
        Some(s) if index.to_kstr().as_str() == "size" => Some(ValueCow::Owned(Value::scalar(
            s.to_kstr().as_str().len() as i64,
        ))),
        _ => None,
    }
}

/// Follows `path` from `start`; anything that leads nowhere is [`MISSING`].
fn walk<'a>(start: &'a dyn ValueView, path: &[ScalarCow<'_>]) -> ValueCow<'a> {
    let mut current = ValueCow::Borrowed(start);
    for index in path {
        let next = match &current {
            ValueCow::Borrowed(v) => step(*v, index),
            ValueCow::Owned(v) => step(v, index).map(|c| ValueCow::Owned(c.into_owned())),
        };
        match next {
            Some(n) => current = n,
            None => return ValueCow::Borrowed(&MISSING),
        }
    }
    current
}

impl Runtime for Scope<'_> {
    fn partials(&self) -> &dyn PartialStore {
        &NoPartials
    }

    fn name(&self) -> Option<KStringRef<'_>> {
        None
    }

    fn roots(&self) -> BTreeSet<KStringCow<'_>> {
        let mut roots: BTreeSet<KStringCow<'_>> = NAMESPACES[1..]
            .iter()
            .copied()
            .chain(["context"])
            .map(KStringCow::from_static)
            .collect();
        roots.extend(
            self.assigned
                .borrow()
                .keys()
                .map(|k| KStringCow::from(k.clone())),
        );
        roots
    }

    fn try_get(&self, path: &[ScalarCow<'_>]) -> Option<ValueCow<'_>> {
        let first = path.first()?.to_kstr();
        if let Some(value) = self.assigned.borrow().get(first.as_str()) {
            let found = walk(value, &path[1..]);
            return Some(if found.is_nil() {
                ValueCow::Borrowed(&MISSING)
            } else {
                ValueCow::Owned(found.into_owned())
            });
        }
        let node = self.root.namespace(first.as_str())?;
        Some(walk(node, &path[1..]))
    }

    fn get(&self, path: &[ScalarCow<'_>]) -> liquid_core::Result<ValueCow<'_>> {
        Ok(self.try_get(path).unwrap_or(ValueCow::Borrowed(&MISSING)))
    }

    fn set_global(&self, name: KString, val: Value) -> Option<Value> {
        if value_size(&val, MAX_OUTPUT_BYTES) > MAX_OUTPUT_BYTES {
            self.stop("an assigned or captured value grew too big");
            return self.assigned.borrow_mut().insert(name, Value::Nil);
        }
        self.assigned.borrow_mut().insert(name, val)
    }

    fn set_index(&self, name: KString, val: Value) -> Option<Value> {
        self.counters.borrow_mut().insert(name, val)
    }

    fn get_index<'a>(&'a self, name: &str) -> Option<ValueCow<'a>> {
        let value = self.counters.borrow().get(name).cloned();
        value.map(ValueCow::Owned)
    }

    fn registers(&self) -> &Registers {
        let steps = self.steps.get() + 1;
        self.steps.set(steps);
        if steps > MAX_RENDER_STEPS {
            self.stop("the template takes too many steps (loops nested too deep or too long)");
        }
        &self.registers
    }
}

/// Collects the output and refuses to grow past [`MAX_OUTPUT_BYTES`].
#[derive(Default)]
struct CappedWriter {
    buf: Vec<u8>,
    exceeded: bool,
}

impl Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > MAX_OUTPUT_BYTES {
            self.exceeded = true;
            return Err(io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// -- preprocessing: Braze syntax into Liquid the crate parses ---------------------------------

/// The rewritten source and how its offsets map back to the author's.
struct Rewritten {
    text: String,
    segments: Vec<Segment>,
}

/// A run of the rewritten text starting at `out`, from the source at `src`: copied as is
/// (offsets inside map one to one) or rewritten (offsets inside map to its start).
#[derive(Debug, Clone, Copy)]
struct Segment {
    out: usize,
    src: usize,
    verbatim: bool,
}

impl Rewritten {
    fn source_offset(&self, out: usize) -> usize {
        let i = self.segments.partition_point(|s| s.out <= out);
        match i.checked_sub(1).map(|i| self.segments[i]) {
            Some(s) if s.verbatim => s.src + (out - s.out),
            Some(s) => s.src,
            None => out,
        }
    }
}

struct RewriteWriter<'s> {
    src: &'s str,
    out: Rewritten,
}

impl<'s> RewriteWriter<'s> {
    fn verbatim(&mut self, from: usize, to: usize) {
        if from < to {
            self.out.segments.push(Segment {
                out: self.out.text.len(),
                src: from,
                verbatim: true,
            });
            self.out.text.push_str(&self.src[from..to]);
        }
    }

    fn rewritten(&mut self, src_at: usize, text: &str) {
        self.out.segments.push(Segment {
            out: self.out.text.len(),
            src: src_at,
            verbatim: false,
        });
        self.out.text.push_str(text);
    }
}

const BLOCKS: [&str; 8] = [
    "if",
    "unless",
    "case",
    "for",
    "tablerow",
    "capture",
    "comment",
    "ifchanged",
];

fn parse_error_at(source: &str, offset: usize, why: &str) -> ParseError {
    let (line, column) = line_column(source, offset);
    ParseError {
        message: format!("line {line}, column {column}: {why}"),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Rewrites Braze's additions inside `{{ }}` and `{% %}`: `${name}` lookups,
/// `abort_message(…)`, ranges in `for` that need clamping; and checks the nesting limits.
/// Text outside delimiters and `{% raw %}` bodies are copied as they are. Anything this does
/// not understand is left for the Liquid parser to report.
fn preprocess(source: &str) -> Result<Rewritten, ParseError> {
    let b = source.as_bytes();
    let mut w = RewriteWriter {
        src: source,
        out: Rewritten {
            text: String::with_capacity(source.len() + 64),
            segments: Vec::new(),
        },
    };
    let mut i = 0;
    let mut depth = 0usize;
    let mut ranges = 0usize;
    while let Some(open) = find_open(b, i) {
        let is_tag = b[open + 1] == b'%';
        let Some((inner_end, close_end)) = scan_delimited(b, open + 2, is_tag) else {
            break;
        };
        w.verbatim(i, open);
        i = close_end;
        let inner = &source[open + 2..inner_end];
        let replacement = if is_tag {
            let (lead, name, rest) = split_tag(inner);
            if name == "raw" {
                let end = find_endraw(b, close_end).unwrap_or(b.len());
                w.verbatim(open, end);
                i = end;
                continue;
            }
            if BLOCKS.contains(&name) {
                depth += 1;
                if depth > MAX_BLOCK_DEPTH {
                    return Err(parse_error_at(
                        source,
                        open,
                        &format!("blocks are nested more than {MAX_BLOCK_DEPTH} deep"),
                    ));
                }
            } else if name
                .strip_prefix("end")
                .is_some_and(|opened| BLOCKS.contains(&opened))
            {
                depth = depth.saturating_sub(1);
            }
            let rest = rewrite_names(rest).map_err(|why| parse_error_at(source, open, why))?;
            let rest = widen_big_integers(rest);
            check_nesting(&rest).map_err(|why| parse_error_at(source, open, &why))?;
            let special = rewrite_tag(lead, name, &rest, &mut ranges)
                .map_err(|why| parse_error_at(source, open, &why))?;
            match (special, rest) {
                (Some(text), _) => Some(text),
                (None, Cow::Owned(rest)) => Some(format!("{{%{lead}{name}{rest}%}}")),
                (None, Cow::Borrowed(_)) => None,
            }
        } else {
            let inner2 = rewrite_names(inner).map_err(|why| parse_error_at(source, open, why))?;
            let inner2 = widen_big_integers(inner2);
            check_nesting(&inner2).map_err(|why| parse_error_at(source, open, &why))?;
            match inner2 {
                Cow::Borrowed(_) => None,
                Cow::Owned(s) => Some(format!("{{{{{s}}}}}")),
            }
        };
        match replacement {
            Some(text) => w.rewritten(open, &text),
            None => w.verbatim(open, close_end),
        }
    }
    w.verbatim(i, b.len());
    Ok(w.out)
}

/// The next `{{` or `{%` at or after `from`.
fn find_open(b: &[u8], from: usize) -> Option<usize> {
    b.get(from..)?
        .windows(2)
        .position(|w| w[0] == b'{' && (w[1] == b'{' || w[1] == b'%'))
        .map(|p| from + p)
}

/// The end of a delimited region starting at `start` (just after `{{`/`{%`): the offsets of
/// its closing `}}`/`%}` and just past it. String literals and `${…}` may contain the closer.
fn scan_delimited(b: &[u8], start: usize, is_tag: bool) -> Option<(usize, usize)> {
    let mut k = start;
    while k < b.len() {
        match b[k] {
            q @ (b'\'' | b'"') => {
                k += 1 + b.get(k + 1..)?.iter().position(|&c| c == q)? + 1;
            }
            b'$' if b.get(k + 1) == Some(&b'{') => {
                match b[k + 2..].iter().position(|&c| c == b'}') {
                    Some(p) => k += 2 + p + 1,
                    None => k += 2,
                }
            }
            b'%' if is_tag && b.get(k + 1) == Some(&b'}') => return Some((k, k + 2)),
            b'}' if !is_tag && b.get(k + 1) == Some(&b'}') => return Some((k, k + 2)),
            _ => k += 1,
        }
    }
    None
}

/// A tag's inner text as (whitespace control and spaces, name, the rest).
fn split_tag(inner: &str) -> (&str, &str, &str) {
    let body = inner.strip_prefix('-').unwrap_or(inner);
    let body = body.trim_start();
    let lead = &inner[..inner.len() - body.len()];
    let name_len = body
        .bytes()
        .position(|c| !(c.is_ascii_alphanumeric() || c == b'_'))
        .unwrap_or(body.len());
    (lead, &body[..name_len], &body[name_len..])
}

/// Just past the `{% endraw %}` closing a raw block whose opening tag ends at `from`.
fn find_endraw(b: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(open) = find_open(b, at) {
        at = open + 2;
        if b[open + 1] != b'%' {
            continue;
        }
        let mut k = open + 2;
        if b.get(k) == Some(&b'-') {
            k += 1;
        }
        while b.get(k).is_some_and(u8::is_ascii_whitespace) {
            k += 1;
        }
        if !b[k..].starts_with(b"endraw") {
            continue;
        }
        k += "endraw".len();
        while b.get(k).is_some_and(u8::is_ascii_whitespace) {
            k += 1;
        }
        if b.get(k) == Some(&b'-') {
            k += 1;
        }
        if b[k..].starts_with(b"%}") {
            return Some(k + 2);
        }
    }
    None
}

/// The offset just past the string literal opening at `k`, or the end when unterminated.
fn skip_string(b: &[u8], k: usize) -> usize {
    let q = b[k];
    match b[k + 1..].iter().position(|&c| c == q) {
        Some(p) => k + 1 + p + 1,
        None => b.len(),
    }
}

/// `${name}` → `__braze["name"]` at the start of a path, `x.${name}` → `x["name"]` after a dot.
fn rewrite_names(inner: &str) -> Result<Cow<'_, str>, &'static str> {
    if !inner.contains("${") {
        return Ok(Cow::Borrowed(inner));
    }
    let b = inner.as_bytes();
    let mut out = String::with_capacity(inner.len() + 16);
    let (mut k, mut copied) = (0, 0);
    while k < b.len() {
        match b[k] {
            b'\'' | b'"' => k = skip_string(b, k),
            b'$' if b.get(k + 1) == Some(&b'{') => {
                let Some(p) = b[k + 2..].iter().position(|&c| c == b'}') else {
                    break;
                };
                let end = k + 2 + p;
                out.push_str(&inner[copied..k]);
                let name = inner[k + 2..end].trim();
                let quote = if !name.contains('"') {
                    '"'
                } else if !name.contains('\'') {
                    '\''
                } else {
                    return Err("a ${…} name cannot contain both ' and \"");
                };
                if out.ends_with('.') {
                    out.pop();
                } else {
                    out.push_str(STANDARD_ROOT);
                }
                out.push('[');
                out.push(quote);
                out.push_str(name);
                out.push(quote);
                out.push(']');
                k = end + 1;
                copied = k;
            }
            _ => k += 1,
        }
    }
    out.push_str(&inner[copied..]);
    Ok(Cow::Owned(out))
}

/// Integer literals beyond `i64` written as floats (`…0` → `…0.0`): the parser assumes every
/// integer literal fits and panics otherwise. Ruby would keep a big integer; a float is the
/// nearest thing Liquid-rust has.
fn widen_big_integers(inner: Cow<'_, str>) -> Cow<'_, str> {
    let b = inner.as_bytes();
    let mut widen = Vec::new();
    let mut k = 0;
    while k < b.len() {
        match b[k] {
            b'\'' | b'"' => {
                k = skip_string(b, k);
                continue;
            }
            c if c.is_ascii_digit() => {
                let start = k;
                while k < b.len() && b[k].is_ascii_digit() {
                    k += 1;
                }
                let before = &b[..start];
                let in_identifier = before
                    .last()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
                // After a single dot the digits are a float's fraction (`1.5`); after `..`
                // they are a range bound.
                let fraction = before.ends_with(b".") && !before.ends_with(b"..");
                let float = b.get(k) == Some(&b'.') && b.get(k + 1).is_some_and(u8::is_ascii_digit);
                if !in_identifier && !fraction && !float {
                    // A `-` opening the region is whitespace control (`{{-`), not a sign.
                    let sign = before
                        .last()
                        .filter(|c| **c == b'-' || **c == b'+')
                        .filter(|_| start > 1);
                    let digits = &inner[start..k];
                    let fits = match sign {
                        Some(b'-') => format!("-{digits}").parse::<i64>().is_ok(),
                        _ => digits.parse::<i64>().is_ok(),
                    };
                    if !fits {
                        widen.push(k);
                    }
                }
                continue;
            }
            _ => {}
        }
        k += 1;
    }
    if widen.is_empty() {
        return inner;
    }
    let mut out = String::with_capacity(inner.len() + 2 * widen.len());
    let mut copied = 0;
    for at in widen {
        out.push_str(&inner[copied..at]);
        out.push_str(".0");
        copied = at;
    }
    out.push_str(&inner[copied..]);
    Cow::Owned(out)
}

/// Refuses brackets nested deeper than [`MAX_EXPRESSION_DEPTH`] (the grammar recurses).
fn check_nesting(inner: &str) -> Result<(), String> {
    let b = inner.as_bytes();
    let (mut k, mut depth) = (0, 0usize);
    while k < b.len() {
        match b[k] {
            b'\'' | b'"' => {
                k = skip_string(b, k);
                continue;
            }
            b'[' | b'(' => {
                depth += 1;
                if depth > MAX_EXPRESSION_DEPTH {
                    return Err(format!(
                        "brackets are nested more than {MAX_EXPRESSION_DEPTH} deep"
                    ));
                }
            }
            b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        k += 1;
    }
    Ok(())
}

/// The first `(` outside string literals in `s`, with its matching `)`.
fn find_parens(s: &str) -> Option<(usize, usize)> {
    let b = s.as_bytes();
    let mut k = 0;
    let mut open = None;
    while k < b.len() {
        match b[k] {
            b'\'' | b'"' => {
                k = skip_string(b, k);
                continue;
            }
            b'(' if open.is_none() => open = Some(k),
            b')' if open.is_some() => return open.map(|o| (o, k)),
            _ => {}
        }
        k += 1;
    }
    None
}

/// The replacement text (whole, delimiters included) of a tag that needs more than `${}`
/// rewriting, or `None`.
fn rewrite_tag(
    lead: &str,
    name: &str,
    rest: &str,
    ranges: &mut usize,
) -> Result<Option<String>, String> {
    match name {
        // `abort_message("reason")` → `abort_message "reason"` (Liquid tags take no parens).
        "abort_message" if rest.trim_start().starts_with('(') => {
            let Some((open, close)) = find_parens(rest) else {
                return Ok(None);
            };
            Ok(Some(format!(
                "{{%{lead}abort_message {}{}%}}",
                &rest[open + 1..close],
                &rest[close + 1..]
            )))
        }
        "for" | "tablerow" => clamp_range(lead, name, rest, ranges),
        _ => Ok(None),
    }
}

fn int_literal(s: &str) -> Option<i64> {
    s.strip_prefix('+').unwrap_or(s).parse().ok()
}

/// Bounds the range of a `for`/`tablerow`: literal bounds are checked now; variable ones are
/// computed first into fresh variables, the upper one clamped to [`MAX_RANGE_STEPS`] steps.
fn clamp_range(
    lead: &str,
    name: &str,
    rest: &str,
    ranges: &mut usize,
) -> Result<Option<String>, String> {
    let Some((open, close)) = find_parens(rest) else {
        return Ok(None);
    };
    let inside = &rest[open + 1..close];
    let Some(dots) = inside.find("..") else {
        return Ok(None);
    };
    let (low, high) = (inside[..dots].trim(), inside[dots + 2..].trim());
    if low.is_empty() || high.is_empty() {
        return Ok(None);
    }
    if let (Some(lo), Some(hi)) = (int_literal(low), int_literal(high)) {
        if i128::from(hi) - i128::from(lo) >= i128::from(MAX_RANGE_STEPS) {
            return Err(format!(
                "a {name} over ({low}..{high}) would run more than {MAX_RANGE_STEPS} times"
            ));
        }
        return Ok(None);
    }
    let n = *ranges;
    *ranges += 1;
    let (dash, spaces) = match lead.strip_prefix('-') {
        Some(spaces) => ("-", spaces),
        None => ("", lead),
    };
    let steps = MAX_RANGE_STEPS - 1;
    Ok(Some(format!(
        "{{%{dash} assign __tw_lo{n} = {low} | plus: 0 %}}\
         {{% assign __tw_cap{n} = __tw_lo{n} | plus: {steps} %}}\
         {{% assign __tw_hi{n} = {high} | plus: 0 | at_most: __tw_cap{n} %}}\
         {{%{spaces}{name}{}(__tw_lo{n}..__tw_hi{n}){}%}}",
        &rest[..open],
        &rest[close + 1..]
    )))
}

// -- error messages ---------------------------------------------------------------------------

/// `__braze["first_name"]` back into the `${first_name}` the author wrote.
fn unrewrite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(STANDARD_ROOT) {
        out.push_str(&rest[..at]);
        let after = &rest[at + STANDARD_ROOT.len()..];
        let name = after.strip_prefix('[').and_then(|a| {
            let q = a.chars().next().filter(|c| *c == '"' || *c == '\'')?;
            let body = &a[1..];
            let end = body.find(q)?;
            body[end + 1..]
                .starts_with(']')
                .then(|| (&body[..end], end + 4))
        });
        match name {
            Some((name, len)) => {
                out.push_str("${");
                out.push_str(name);
                out.push('}');
                rest = &after[len..];
            }
            None => {
                out.push_str(STANDARD_ROOT);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn truncate_message(mut message: String) -> String {
    const MAX: usize = 300;
    if message.len() > MAX {
        let mut cut = MAX;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

/// What a Liquid error says, taken apart: its first line, pest's `= …` line if any, and the
/// context (`requested filter=…`, the `from:` traces); lists of what is available are left
/// out (they run to hundreds of characters).
struct Summary {
    head: String,
    reason: Option<String>,
    context: Vec<String>,
}

impl Summary {
    fn of(error: &LiquidError) -> Summary {
        let text = error.to_string();
        let mut lines = text.lines();
        let head = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("liquid:")
            .trim()
            .to_owned();
        let mut summary = Summary {
            head,
            reason: None,
            context: Vec::new(),
        };
        for line in lines {
            let line = line.trim();
            if let Some(reason) = line.strip_prefix('=') {
                summary
                    .reason
                    .get_or_insert_with(|| reason.trim().to_owned());
            } else if let Some(from) = line.strip_prefix("from:") {
                summary.context.push(format!("in {}", from.trim()));
            } else if line.contains('=') && !line.starts_with("available") {
                summary.context.push(line.to_owned());
            }
        }
        summary
    }

    /// `what (context; context)`.
    fn line(what: String, context: &[String]) -> String {
        let mut message = what;
        if !context.is_empty() {
            message.push_str(" (");
            message.push_str(&context.join("; "));
            message.push(')');
        }
        truncate_message(unrewrite(&message))
    }
}

fn describe_render_error(error: &LiquidError) -> String {
    let summary = Summary::of(error);
    Summary::line(summary.head, &summary.context)
}

/// A parse error with the position mapped back to the author's source. Pest reports
/// `--> line:column` in the rewritten text and what went wrong on a `= …` line.
fn describe_parse_error(error: &LiquidError, rewritten: &Rewritten, source: &str) -> String {
    let summary = Summary::of(error);
    let position = summary
        .head
        .strip_prefix("-->")
        .and_then(|p| p.trim().split_once(':'))
        .and_then(|(l, c)| Some((l.trim().parse().ok()?, c.trim().parse().ok()?)));
    match position {
        Some((line, column)) => {
            let out = offset_of(&rewritten.text, line, column);
            let (line, column) = line_column(source, rewritten.source_offset(out));
            let reason = summary
                .reason
                .unwrap_or_else(|| "this is not valid Liquid".to_owned());
            Summary::line(
                format!("line {line}, column {column}: {reason}"),
                &summary.context,
            )
        }
        None => Summary::line(summary.head, &summary.context),
    }
}

/// The byte offset of a 1-based line and column (in characters).
fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let mut offset = 0;
    for _ in 1..line {
        match text[offset..].find('\n') {
            Some(p) => offset += p + 1,
            None => return text.len(),
        }
    }
    text[offset..]
        .char_indices()
        .nth(column.saturating_sub(1))
        .map_or(text.len(), |(i, _)| offset + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn map(v: Json) -> Map<String, Json> {
        match v {
            Json::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn vars() -> Vars {
        Vars {
            standard: map(json!({
                "first_name": "Ada",
                "last_name": "Lovelace",
                "email_address": "ada@example.com",
                "user_id": "u-1",
                "country": "GB",
                "city": "London",
                "language": "en",
                "time_zone": "Europe/London",
            })),
            custom_attribute: map(json!({
                "plan": "gold",
                "Favorite Color": "teal",
                "visits": 3,
                "address": {"city": "Paris", "zip": "75001"},
                "tags": ["a", "b", "c"],
                "empty_text": "",
                "space": " ",
                "flag": false,
                "nothing": null,
            })),
            event_properties: map(json!({
                "items": [
                    {"name": "Tea", "price": 4.5},
                    {"name": "Scone"},
                ],
            })),
            api_trigger_properties: map(json!({"coupon": "SAVE10", "amount": 145})),
            canvas_entry_properties: map(json!({"source": "quiz"})),
            campaign: map(json!({"name": "Welcome", "api_id": "c-1", "dispatch_id": "d-1"})),
            canvas: map(json!({"name": "Journey"})),
            links: map(json!({"set_user_to_unsubscribed_url": "https://t.example/t/u/abc"})),
        }
    }

    fn render(source: &str) -> Result<String, RenderError> {
        Template::parse(source)
            .unwrap_or_else(|e| panic!("{source:?} does not parse: {e}"))
            .render(&vars())
    }

    fn ok(source: &str) -> String {
        render(source).unwrap_or_else(|e| panic!("{source:?} does not render: {e}"))
    }

    #[test]
    fn standard_attributes_with_braze_syntax() {
        assert_eq!(ok("Hi {{${first_name}}}!"), "Hi Ada!");
        assert_eq!(ok("{{ ${first_name} }} {{${last_name}}}"), "Ada Lovelace");
        assert_eq!(
            ok("{{${email_address}}} {{${user_id}}}"),
            "ada@example.com u-1"
        );
        assert_eq!(
            ok("{{${city}}}, {{${country}}} ({{${language}}})"),
            "London, GB (en)"
        );
        assert_eq!(ok("{{${time_zone}}}"), "Europe/London");
        assert_eq!(
            ok("<a href=\"{{${set_user_to_unsubscribed_url}}}\">x</a>"),
            "<a href=\"https://t.example/t/u/abc\">x</a>"
        );
    }

    #[test]
    fn namespaces() {
        assert_eq!(ok("{{custom_attribute.${plan}}}"), "gold");
        assert_eq!(ok("{{custom_attribute.${Favorite Color}}}"), "teal");
        assert_eq!(ok("{{custom_attribute.${address}.city}}"), "Paris");
        assert_eq!(ok("{{custom_attribute.${address.zip}}}"), "75001");
        assert_eq!(ok("{{event_properties.${items}[0].name}}"), "Tea");
        assert_eq!(ok("{{api_trigger_properties.${coupon}}}"), "SAVE10");
        assert_eq!(
            ok("{{canvas_entry_properties.${source}}}/{{context.${source}}}"),
            "quiz/quiz"
        );
        assert_eq!(
            ok("{{campaign.${name}}} {{campaign.${api_id}}} {{campaign.${dispatch_id}}}"),
            "Welcome c-1 d-1"
        );
        assert_eq!(ok("{{canvas.${name}}}"), "Journey");
        // The plain Liquid spelling works too.
        assert_eq!(ok("{{ custom_attribute.plan | upcase }}"), "GOLD");
    }

    #[test]
    fn missing_values_render_empty() {
        assert_eq!(ok("[{{${phone_number}}}]"), "[]");
        assert_eq!(ok("[{{custom_attribute.${nope}}}]"), "[]");
        assert_eq!(ok("[{{custom_attribute.${nope}.deeper.still}}]"), "[]");
        assert_eq!(ok("[{{custom_attribute.${nothing}}}]"), "[]");
        assert_eq!(
            ok("[{{event_properties.${x}}}{{api_trigger_properties.${y}}}]"),
            "[]"
        );
        assert_eq!(ok("[{{ unknown_variable }}{{ unknown.path[3] }}]"), "[]");
        assert_eq!(ok("[{{ custom_attribute.${tags}[10] }}]"), "[]");
        assert_eq!(ok("[{{ ${first_name}.nope }}]"), "[]");
        assert_eq!(
            ok("{% if custom_attribute.${nope} %}yes{% else %}no{% endif %}"),
            "no"
        );
        assert_eq!(
            ok("{% if custom_attribute.${nope} == blank %}blank{% endif %}"),
            "blank"
        );
        assert_eq!(
            ok("{% for t in custom_attribute.${nope} %}x{% endfor %}."),
            "."
        );
        // Loop items keep the leniency: the second item has no price.
        assert_eq!(
            ok("{% for i in event_properties.${items} %}{{i.name}}:{{i.price}};{% endfor %}"),
            "Tea:4.5;Scone:;"
        );
        assert_eq!(
            ok("{% assign a = custom_attribute.${address} %}[{{ a.nope }}]"),
            "[]"
        );
    }

    #[test]
    fn default_filter() {
        assert_eq!(ok("Hi {{${first_name} | default: 'there'}}"), "Hi Ada");
        assert_eq!(ok("Hi {{${nickname} | default: 'there'}}"), "Hi there");
        assert_eq!(ok("{{custom_attribute.${empty_text} | default: 'd'}}"), "d");
        assert_eq!(ok("{{custom_attribute.${flag} | default: 'd'}}"), "d");
        assert_eq!(ok("{{custom_attribute.${nothing} | default: 'd'}}"), "d");
        // Braze: a single space is not replaced.
        assert_eq!(ok("[{{custom_attribute.${space} | default: 'd'}}]"), "[ ]");
    }

    #[test]
    fn reference_control_flow() {
        assert_eq!(
            ok(
                "{% if custom_attribute.${plan} == 'gold' %}VIP{% elsif custom_attribute.${plan} == 'silver' %}S{% else %}-{% endif %}"
            ),
            "VIP"
        );
        assert_eq!(
            ok("{% unless ${first_name} == blank %}named{% endunless %}"),
            "named"
        );
        assert_eq!(
            ok(
                "{% case custom_attribute.${plan} %}{% when 'gold' %}G{% when 'silver' %}S{% endcase %}"
            ),
            "G"
        );
        assert_eq!(
            ok(
                "{% for t in custom_attribute.${tags} limit: 2 offset: 1 %}{{forloop.index}}{{t}}{% endfor %}"
            ),
            "1b2c"
        );
        assert_eq!(
            ok("{% assign n = custom_attribute.${visits} | plus: 1 %}{{n}}"),
            "4"
        );
        assert_eq!(
            ok("{% capture c %}{{${first_name}}}!{% endcapture %}{{c}}{{c}}"),
            "Ada!Ada!"
        );
        assert_eq!(
            ok("a{% comment %} {{${first_name}}} {% endcomment %}b"),
            "ab"
        );
        assert_eq!(
            ok("{% raw %}{{${first_name}}}{% endraw %}"),
            "{{${first_name}}}"
        );
        assert_eq!(
            ok("{% if custom_attribute.${tags} contains 'b' %}has b{% endif %}"),
            "has b"
        );
        assert_eq!(ok("{{- ${first_name} -}} "), "Ada");
        assert_eq!(ok("{% for i in (1..3) %}{{i}}{% endfor %}"), "123");
        assert_eq!(
            ok("{% for i in (1..custom_attribute.${visits}) %}{{i}}{% endfor %}"),
            "123"
        );
    }

    #[test]
    fn filters() {
        assert_eq!(
            ok("{{ ${first_name} | upcase }} {{ ${first_name} | downcase }}"),
            "ADA ada"
        );
        assert_eq!(
            ok("{{ 'hello world' | capitalize | append: '!' | prepend: '> ' }}"),
            "> Hello world!"
        );
        assert_eq!(
            ok("{{ custom_attribute.${tags} | join: ',' }} {{ custom_attribute.${tags} | size }}"),
            "a,b,c 3"
        );
        assert_eq!(
            ok("{{ 7 | divided_by: 2 }} {{ 7.0 | divided_by: 2 }} {{ -7 | divided_by: 2 }}"),
            "3 3.5 -4"
        );
        assert_eq!(
            ok("{{ -7 | modulo: 3 }} {{ 2 | times: 3 | minus: 1 }}"),
            "2 5"
        );
        assert_eq!(
            ok("{{ api_trigger_properties.${amount} | money }}"),
            "145.00"
        );
        assert_eq!(ok("{{ ${nickname} | plus: 2 }}"), "2");
        assert!(ok("{{ 9223372036854775807 | plus: 1 | at_least: 0 }}").starts_with('9'));
        assert_eq!(ok("{{ 'a\"b\nc' | json_escape }}"), "a\\\"b\\nc");
        assert_eq!(
            ok("{{ 'abc' | sha2 }}"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ok("{{ 'hi' | base64_encode }}"), "aGk=");
        assert_eq!(
            ok("{{ 'The quick brown fox jumps over the lazy dog' | hmac_sha256: 'key' }}"),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        assert_eq!(
            ok("{{ 'a b' | url_encode }} {{ '<b>' | escape }}"),
            "a%20b &lt;b&gt;"
        );
    }

    #[test]
    fn lenient_number_array_and_date_filters() {
        assert_eq!(ok("[{{ custom_attribute.${nope} | join: ',' }}]"), "[]");
        assert_eq!(
            ok("[{{ ${nope} | first }}{{ ${nope} | map: 'a' | uniq }}]"),
            "[]"
        );
        assert_eq!(
            ok("[{{ unknown | last }}{{ unknown | compact | size }}]"),
            "[0]"
        );
        assert_eq!(
            ok("{{ ${nope} | round }} {{ ${nope} | at_least: 1 }}"),
            "0 1"
        );
        assert_eq!(
            ok("{{ 1.456 | round: 2 }} {{ 1.5 | round }} {{ 7 | round: 2 }}"),
            "1.46 2 7"
        );
        assert_eq!(
            ok("{{ 4.2 | ceil }} {{ 4.8 | floor }} {{ 3 | at_most: 2.5 }}"),
            "5 4 2.5"
        );
        assert_eq!(
            ok("{{ '2024-01-02T03:04:05Z' | date: '%b %d %Y' }}"),
            "Jan 02 2024"
        );
        assert_eq!(
            ok("{{ '2024-01-02T03:04:05.123+02:00' | date: '%H:%M %z' }}"),
            "03:04 +0200"
        );
        assert_eq!(ok("{{ '2024-01-02' | date: '%Y/%m/%d' }}"), "2024/01/02");
        assert_eq!(
            ok("{{ 1700000000 | date: '%Y' }} {{ 'garbage' | date: '%Y' }}"),
            "2023 garbage"
        );
        assert_eq!(ok("[{{ custom_attribute.${nope} | date: '%Y' }}]"), "[]");
        assert!(ok("{{ 'now' | date: '%Y' }}").starts_with("20"));
    }

    #[test]
    fn abort_message() {
        let abort = |s: &str| match render(s) {
            Err(RenderError::Abort { log }) => log,
            other => panic!("{s:?} did not abort: {other:?}"),
        };
        assert_eq!(abort("{% abort_message(\"no plan\") %}"), "no plan");
        assert_eq!(abort("x{% abort_message('single') %}y"), "single");
        assert_eq!(abort("{% abort_message() %}"), DEFAULT_ABORT_LOG);
        assert_eq!(abort("{% abort_message %}"), DEFAULT_ABORT_LOG);
        assert_eq!(
            abort("{%- abort_message( \"spaced out\" ) -%}"),
            "spaced out"
        );
        assert_eq!(
            abort(
                "{% if custom_attribute.${plan} == 'gold' %}{% abort_message(\"gold\") %}{% endif %}"
            ),
            "gold"
        );
        assert_eq!(
            abort(
                "{% for t in custom_attribute.${tags} %}{% capture c %}{% abort_message('deep') %}{% endcapture %}{% endfor %}"
            ),
            "deep"
        );
        let long = "x".repeat(300);
        assert_eq!(
            abort(&format!("{{% abort_message('{long}') %}}"))
                .chars()
                .count(),
            MAX_ABORT_LOG_CHARS
        );
        // Not taken: renders normally.
        assert_eq!(
            ok("{% if false %}{% abort_message('no') %}{% endif %}ok"),
            "ok"
        );
    }

    #[test]
    fn parse_errors_say_where_and_what() {
        let err = |s: &str| Template::parse(s).expect_err(s).message;
        let e = err("Hello\n  {{ ${first_name} | }}");
        assert_eq!(e, "line 2, column 3: expected Identifier");
        assert_eq!(err("{{ x | }}"), "line 1, column 8: expected Identifier");
        let e = err("{% if x %}never closed");
        assert!(e.contains("{% endif %}"), "{e}");
        let e = err("{{ ${first_name} | no_such_filter }}");
        assert!(
            e.contains("Unknown filter") && e.contains("no_such_filter"),
            "{e}"
        );
        assert!(!e.contains("available"), "{e}");
        let e = err("{{ ${first_name} | append }}");
        assert!(e.contains("append"), "{e}");
        assert!(!e.contains(STANDARD_ROOT), "{e}");
        let e = err("{% no_such_tag %}");
        assert!(e.starts_with("line 1, column 4: Unknown tag"), "{e}");
        assert!(e.contains("no_such_tag"), "{e}");
        let e = err("{{ ${first_name} }}\n{% for i in (1..1000000) %}{% endfor %}");
        assert!(
            e.starts_with("line 2, column 1:") && e.contains("more than"),
            "{e}"
        );
        let e = err(&"{% if a %}".repeat(MAX_BLOCK_DEPTH + 1));
        assert!(e.contains("nested"), "{e}");
        let e = err(&format!(
            "{{{{ a{}b }}}}",
            "[".repeat(MAX_EXPRESSION_DEPTH + 1)
        ));
        assert!(e.contains("nested"), "{e}");
        let e = err(&"x".repeat(MAX_TEMPLATE_BYTES + 1));
        assert!(e.contains("bytes"), "{e}");
        let e = err("{{ ${it's \"quoted\"} }}");
        assert!(e.contains("both"), "{e}");
    }

    #[test]
    fn variable_ranges_are_clamped() {
        let t = Template::parse("{% for i in (1..custom_attribute.${n}) %}.{% endfor %}").unwrap();
        let mut v = vars();
        v.custom_attribute
            .insert("n".into(), json!(1_000_000_000_000i64));
        assert_eq!(t.render(&v).unwrap().len(), MAX_RANGE_STEPS as usize);
        v.custom_attribute.insert("n".into(), json!(-5));
        assert_eq!(t.render(&v).unwrap(), "");
    }

    #[test]
    fn output_is_capped() {
        let t = Template::parse(
            "{% for i in (1..10000) %}{% for j in (1..10000) %}0123456789{% endfor %}{% endfor %}",
        )
        .unwrap();
        match t.render(&Vars::default()) {
            Err(RenderError::Failed { message }) => assert!(message.contains("bytes"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn work_is_bounded() {
        let failed = |s: &str| match Template::parse(s).unwrap().render(&vars()) {
            Err(RenderError::Failed { message }) => message,
            other => panic!("{s:?}: {other:?}"),
        };
        let e =
            failed("{% for i in (1..10000) %}{% for j in (1..10000) %}{% endfor %}{% endfor %}");
        assert!(e.contains("steps"), "{e}");
        let e = failed(
            "{% assign s = 'xxxxxxxxxxxxxxxx' %}{% for i in (1..64) %}{% capture s %}{{s}}{{s}}{% endcapture %}{% endfor %}",
        );
        assert!(e.contains("too big"), "{e}");
        let e = failed(
            "{% assign s = 'xxxxxxxxxxxxxxxx' %}{% for i in (1..64) %}{% assign s = s | append: s %}{% endfor %}done",
        );
        assert!(e.contains("too big"), "{e}");
        // Within the budget, loops run to the end.
        assert_eq!(
            ok("{% for i in (1..100) %}{% for j in (1..100) %}{% endfor %}{% endfor %}x"),
            "x"
        );
    }

    #[test]
    fn render_errors_are_failures_not_panics() {
        let t = Template::parse("{{ 1 | divided_by: 0 }}").unwrap();
        assert!(matches!(t.render(&vars()), Err(RenderError::Failed { .. })));
        let t = Template::parse("{{ -9223372036854775808 | divided_by: -1 }}").unwrap();
        assert!(t.render(&vars()).is_ok());
        let t = Template::parse("{{ -9223372036854775808 | abs }}").unwrap();
        assert!(t.render(&vars()).is_ok());
        let t = Template::parse("{{-9223372036854775808}} {{ 99999999999999999999 | plus: 1 }}")
            .unwrap();
        assert!(t.render(&vars()).is_ok());
        assert!(Template::parse("{% for i in (1..99999999999999999999) %}{% endfor %}").is_ok());
    }

    #[test]
    fn templates_are_shareable_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Template>();
    }

    #[test]
    fn check_all_names_the_place() {
        let good = "{{${first_name}}}";
        let bad = "{{ x | }}";
        assert!(check_all(vec![("messages[0].body".to_owned(), good)]).is_ok());
        let e = check_all(vec![
            ("messages[0].subject".to_owned(), good),
            ("messages[0].body".to_owned(), bad),
        ])
        .unwrap_err();
        assert_eq!(e.path, "messages[0].body");
        assert!(e.message.contains("line 1"), "{}", e.message);
    }

    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("{{".to_owned()),
            Just("}}".to_owned()),
            Just("{%".to_owned()),
            Just("%}".to_owned()),
            Just("${".to_owned()),
            Just("}".to_owned()),
            Just("${first_name}".to_owned()),
            Just("custom_attribute.${tags}".to_owned()),
            Just("custom_attribute.${address}".to_owned()),
            Just(" if ".to_owned()),
            Just(" endif ".to_owned()),
            Just(" for i in ".to_owned()),
            Just(" endfor ".to_owned()),
            Just("(1..custom_attribute.${visits})".to_owned()),
            Just("(-3..2)".to_owned()),
            Just(" raw ".to_owned()),
            Just(" endraw ".to_owned()),
            Just(" comment ".to_owned()),
            Just(" capture c ".to_owned()),
            Just("abort_message(".to_owned()),
            Just(")".to_owned()),
            Just("'".to_owned()),
            Just("\"".to_owned()),
            Just(" | ".to_owned()),
            Just("default: 'x'".to_owned()),
            Just("divided_by: 0".to_owned()),
            Just("modulo: -1".to_owned()),
            Just("-9223372036854775808".to_owned()),
            Just("[".to_owned()),
            Just("]".to_owned()),
            Just("-".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("size".to_owned()),
            Just("forloop.index".to_owned()),
            "[ -~]{0,6}",
            "\\PC{0,3}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Whatever the input, parsing and rendering return, without relying on the
        /// `catch_unwind` net (these call the unguarded paths).
        #[test]
        fn never_panics_on_arbitrary_templates(parts in prop::collection::vec(fragment(), 0..24)) {
            let source = parts.concat();
            if let Ok(t) = parse_unguarded(&source) {
                let _ = t.render_unguarded(&vars());
                let _ = t.render_unguarded(&Vars::default());
            }
        }

        #[test]
        fn never_panics_on_arbitrary_strings(source in "\\PC{0,80}") {
            if let Ok(t) = parse_unguarded(&source) {
                let _ = t.render_unguarded(&vars());
            }
        }

        /// Text without Liquid delimiters is its own output.
        #[test]
        fn plain_text_is_untouched(text in "[^{%}]{0,60}") {
            prop_assert_eq!(ok(&text), text);
        }
    }
}
