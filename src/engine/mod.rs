//! The rule engine: one locked-down Rhai engine, rules compiled once and
//! shared, evaluation that returns planned actions and does no I/O.
//!
//! Rule functions (`count`, `send_email`, …) need the customer being
//! evaluated. Rhai native functions cannot see the script's scope, so the
//! evaluation context lives in a thread-local for the duration of one
//! evaluation (`ContextGuard`); evaluations run on rayon threads, one
//! customer-rule pair at a time per thread.

mod api;
mod budget;
mod value;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rhai::{AST, Dynamic, Engine, EvalAltResult, Position, Scope};

use crate::facts::Facts;
use crate::plan::{ActionRequest, PlannedAction};

pub use value::{ShapeError, Timestamp, dynamic_to_json, json_to_dynamic};

/// Limits that stop a runaway rule in milliseconds.
pub const MAX_OPERATIONS: u64 = 200_000;
pub const MAX_CALL_LEVELS: usize = 32;
pub const MAX_STRING_SIZE: usize = 64 * 1024;
pub const MAX_ARRAY_SIZE: usize = 10_000;
pub const MAX_MAP_SIZE: usize = 10_000;
/// How deep a rule's values may nest arrays, maps and curried functions:
/// Rhai clones, drops, compares and prints values by recursion, so a value
/// nested 10,000 deep overflows the stack and aborts the whole process.
pub const MAX_DEPTH: usize = 64;
/// How many items (array items, map entries, curried arguments) one value
/// may hold, counted through every level.
pub const MAX_ITEMS: usize = MAX_ARRAY_SIZE + MAX_MAP_SIZE;
/// CPU time one evaluation (one rule for one customer) may use: one
/// operation can be container-sized, so the operation limit alone lets a
/// rule take seconds. 50 ms in release builds; unoptimised (debug) builds
/// run Rhai about ten times slower and get 400 ms, so that there too the
/// operation limit, not the clock, stops a plain endless loop.
pub const CPU_BUDGET: Duration = if cfg!(debug_assertions) {
    Duration::from_millis(400)
} else {
    Duration::from_millis(50)
};
/// Evaluations are timed from this many operations on (ordinary rules
/// finish long before and never read a clock), or from the first access to
/// a value of [`BIG_VALUE_ITEMS`] items, whichever comes first …
const BUDGET_FROM_OPS: u64 = 256;
/// … and checked every this many operations after that …
const BUDGET_EVERY_OPS: u64 = 64;
/// … and at every access to a value this large.
const BIG_VALUE_ITEMS: usize = 1_000;

/// A located error in a rule: `FILE:LINE:COL: message`.
pub type RuleError = crate::diagnostic::Diagnostic;

/// One compiled rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The file stem: `rules/welcome.rhai` → `welcome`.
    pub id: String,
    pub path: PathBuf,
    /// From `// @priority N` and `// @when_capped drop|defer` comment lines.
    pub policy: crate::policy::RulePolicy,
    ast: AST,
}

/// Reads the rule's policy directives: comment lines `// @priority 10`
/// (higher wins when the frequency cap bites; default 0) and
/// `// @when_capped drop` (default `defer`: not planned now, planned again
/// at the next run that has room).
fn directives(path: &Path, source: &str) -> Result<crate::policy::RulePolicy, RuleError> {
    let mut policy = crate::policy::RulePolicy {
        priority: 0,
        drop_when_capped: false,
    };
    for (i, line) in source.lines().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("//") else {
            continue;
        };
        let Some(directive) = rest.trim_start().strip_prefix('@') else {
            continue;
        };
        let (name, value) = directive
            .split_once([' ', ':', '='])
            .unwrap_or((directive, ""));
        let value = value.trim().trim_matches(['"', ':', '=', ' ']);
        let err = |message: String| RuleError {
            path: path.to_owned(),
            line: i + 1,
            col: 1,
            message,
        };
        match name.trim() {
            "priority" => {
                policy.priority = value
                    .parse()
                    .map_err(|_| err(format!("@priority needs a whole number, not {value:?}")))?;
            }
            "when_capped" => {
                policy.drop_when_capped = match value {
                    "drop" => true,
                    "defer" => false,
                    other => {
                        return Err(err(format!("@when_capped is drop or defer, not {other:?}")));
                    }
                };
            }
            other => {
                return Err(err(format!(
                    "unknown directive @{other}; known: @priority, @when_capped"
                )));
            }
        }
    }
    Ok(policy)
}

/// Per-evaluation state reachable from native functions.
struct EvalContext {
    facts: Arc<Facts>,
    rule: String,
    planned: Vec<ActionRequest>,
    /// When explaining: every fact the rule read, as `count("login", 7) = 0`.
    reads: Option<Vec<String>>,
    /// The CPU-time budget, once this evaluation is being timed.
    budget: Option<budget::Budget>,
}

impl EvalContext {
    /// Notes a fact read (only when explaining; the closure is not called otherwise).
    fn read(&mut self, describe: impl FnOnce() -> String) {
        if let Some(reads) = &mut self.reads {
            reads.push(describe());
        }
    }
}

thread_local! {
    static CONTEXT: RefCell<Option<EvalContext>> = const { RefCell::new(None) };
}

/// Installs an evaluation context on this thread and removes it on drop,
/// even if evaluation panics.
struct ContextGuard;

impl ContextGuard {
    /// Installs the context for one customer; [`ContextGuard::start`] each
    /// rule evaluated for them.
    fn install(facts: Arc<Facts>, trace: bool) -> Self {
        CONTEXT.with(|c| {
            *c.borrow_mut() = Some(EvalContext {
                facts,
                rule: String::new(),
                planned: Vec::new(),
                reads: trace.then(Vec::new),
                budget: None,
            })
        });
        Self
    }

    /// Starts the evaluation of `rule` with a fresh CPU budget (what the
    /// last rule planned and read was taken by `take_planned`/`take_reads`).
    fn start(&self, rule: &str) {
        CONTEXT.with(|c| {
            if let Some(ctx) = c.borrow_mut().as_mut() {
                ctx.rule.clear();
                ctx.rule.push_str(rule);
                ctx.budget = None;
            }
        })
    }

    fn take_reads(&self) -> Vec<String> {
        CONTEXT.with(|c| {
            c.borrow_mut()
                .as_mut()
                .and_then(|ctx| ctx.reads.as_mut().map(std::mem::take))
                .unwrap_or_default()
        })
    }

    fn take_planned(&self) -> Vec<ActionRequest> {
        CONTEXT.with(|c| {
            c.borrow_mut()
                .as_mut()
                .map(|ctx| std::mem::take(&mut ctx.planned))
                .unwrap_or_default()
        })
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        CONTEXT.with(|c| *c.borrow_mut() = None);
    }
}

/// Runs `f` with the current evaluation context; an error if called outside one.
fn with_context<R>(
    f: impl FnOnce(&mut EvalContext) -> Result<R, Box<EvalAltResult>>,
) -> Result<R, Box<EvalAltResult>> {
    CONTEXT.with(|c| match c.borrow_mut().as_mut() {
        Some(ctx) => f(ctx),
        None => Err("rule functions can only be called while a rule is evaluated".into()),
    })
}

/// Starts timing this evaluation, or checks its budget: the error message
/// once the budget is spent.
fn spend_budget() -> Option<String> {
    CONTEXT.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        let ctx = c.as_mut()?;
        match &mut ctx.budget {
            None => {
                ctx.budget = Some(budget::Budget::start(CPU_BUDGET));
                None
            }
            Some(b) => b.exceeded().map(|used| {
                format!(
                    "this rule used more than {} ms of CPU time for customer {} ({} ms); a rule runs once per customer, so its work must stay small: look for a loop over a large array or map, or a search through one inside a loop",
                    CPU_BUDGET.as_millis(),
                    ctx.facts.customer.id,
                    used.as_millis()
                )
            }),
        }
    })
}

/// An error a rule cannot catch (`try … catch` would let it run on).
fn uncatchable(message: String) -> Box<EvalAltResult> {
    EvalAltResult::ErrorTerminated(Dynamic::from(message), Position::NONE).into()
}

thread_local! {
    /// Rhai's function-resolution caches of one rule set's rules (by
    /// position), kept between evaluations on this thread: a fresh cache
    /// per evaluation made every operator and call a full lookup.
    static RESOLUTION_CACHES: RefCell<(u64, Vec<rhai::Caches>)> = const { RefCell::new((0, Vec::new())) };
}

/// A number no other rule set has (0 is none's).
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// All rules of a directory, compiled with one engine.
pub struct RuleSet {
    engine: Engine,
    rules: Vec<Rule>,
    /// Tells this set's rules apart from another's in [`RESOLUTION_CACHES`].
    generation: u64,
    /// Function name → its signatures, for "expected …" hints.
    signatures: std::collections::HashMap<String, Vec<String>>,
}

fn signatures(engine: &Engine) -> std::collections::HashMap<String, Vec<String>> {
    let mut map: std::collections::HashMap<String, Vec<String>> = Default::default();
    for sig in engine.gen_fn_signatures(true) {
        // `count(_: string, _: i64) -> Result<…>` → `count(string, i64)`
        let head = sig.split(" -> ").next().unwrap_or(&sig).replace("_: ", "");
        if let Some(name) = head.split('(').next() {
            map.entry(name.trim().to_owned())
                .or_default()
                .push(head.clone());
        }
    }
    map
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet")
            .field("rules", &self.rules)
            .finish()
    }
}

/// What a rule sees in scope when it runs for this customer: `customer`
/// and `now`, as constants (a rule cannot change them for the rules after it).
fn customer_scope(facts: &Facts) -> Scope<'static> {
    let mut scope = Scope::new();
    scope.push_constant("customer", value::customer_to_dynamic(facts));
    scope.push_constant("now", Timestamp(facts.now));
    scope
}

/// The names every rule sees in scope. Pushed as variables (not constants):
/// constants pushed at compile time would be baked into the AST.
fn base_scope() -> Scope<'static> {
    let mut scope = Scope::new();
    scope.push("customer", Dynamic::UNIT);
    scope.push("now", Dynamic::UNIT);
    scope
}

/// Names rules may refer to. When known, `send_email` and `webhook` reject
/// unknown names at evaluation time (with the rule's file and line).
#[derive(Clone, Debug, Default)]
pub struct Known {
    pub templates: Option<Arc<HashSet<String>>>,
    pub webhooks: Option<Arc<HashSet<String>>>,
}

/// Builds the locked-down engine.
pub fn build_engine(known: Known) -> Engine {
    let mut engine = Engine::new();
    engine
        .set_max_operations(MAX_OPERATIONS)
        .set_max_call_levels(MAX_CALL_LEVELS)
        .set_max_expr_depths(64, 32)
        .set_max_string_size(MAX_STRING_SIZE)
        .set_max_array_size(MAX_ARRAY_SIZE)
        .set_max_map_size(MAX_MAP_SIZE)
        .set_max_variables(1_000)
        .set_max_functions(200)
        .set_max_modules(0)
        .set_strict_variables(true)
        .set_fail_on_invalid_map_property(false)
        // Let the comparison guards below take part in operator resolution.
        .set_fast_operators(false);
    engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    engine.disable_symbol("eval");
    engine.disable_symbol("import");
    // Methods mutate `this` in place without naming a variable, which would
    // let a value nest deeper past the check on variable access (below).
    engine.disable_symbol("this");
    engine.on_print(|s| {
        let (rule, customer) = current_names();
        tracing::info!(rule, customer, "rule printed: {s}");
    });
    engine.on_debug(|s, _src, pos| {
        let (rule, customer) = current_names();
        tracing::debug!(rule, customer, line = pos.line(), "rule debug: {s}");
    });
    // Rules must not read the real clock (`--now` replays history) or stall
    // a worker: Rhai's own `timestamp()` and `sleep()` are replaced.
    engine.register_fn("timestamp", || -> Result<(), Box<EvalAltResult>> {
        Err("timestamp() is not available in rules; use `now`, the evaluation time".into())
    });
    engine.register_fn("sleep", |_: i64| -> Result<(), Box<EvalAltResult>> {
        Err("sleep() is not available in rules".into())
    });
    engine.register_fn("sleep", |_: f64| -> Result<(), Box<EvalAltResult>> {
        Err("sleep() is not available in rules".into())
    });
    // Rhai checks a map's size when it is passed to a function, but not when
    // a key is added by index (`m[k] = v`), so a loop could grow a map far
    // past the limit. Every variable access checks the maps and arrays the
    // script holds in scope; the error points at the access.
    //
    // The same access checks how deep the value nests and how many items it
    // holds in all (`value::check_shape`). Values only grow by being built
    // from values read from variables, so no value gets deeper than
    // MAX_DEPTH plus what one expression adds, and no recursion in Rhai or
    // here can overflow the stack. The walk also makes container-sized work
    // count towards the CPU budget as soon as it happens.
    // Rhai marks `on_var` deprecated only to say its signature may change.
    #[allow(deprecated)]
    engine.on_var(|name, _, context| {
        let Some(value) = context.scope().get(name) else {
            return Ok(None);
        };
        if value.is_map()
            && value
                .read_lock::<rhai::Map>()
                .is_some_and(|m| m.len() > MAX_MAP_SIZE)
        {
            return Err(EvalAltResult::ErrorDataTooLarge(
                "Size of object map".into(),
                Position::NONE,
            )
            .into());
        }
        match value::check_shape(value) {
            Ok(items) if items >= BIG_VALUE_ITEMS => match spend_budget() {
                Some(message) => Err(uncatchable(message)),
                None => Ok(None),
            },
            Ok(_) => Ok(None),
            Err(e) => Err(uncatchable(format!(
                "`{name}` holds {e}; keep rule data small and flat"
            ))),
        }
    });
    engine.on_progress(|ops| {
        if ops < BUDGET_FROM_OPS || ops % BUDGET_EVERY_OPS != 0 {
            return None;
        }
        spend_budget().map(Dynamic::from)
    });
    register_comparison_guards(&mut engine);
    value::register_timestamp(&mut engine);
    api::register(&mut engine, known);
    engine
}

fn current_names() -> (String, String) {
    CONTEXT.with(|c| {
        c.borrow()
            .as_ref()
            .map(|ctx| (ctx.rule.clone(), ctx.facts.customer.id.to_string()))
            .unwrap_or_default()
    })
}

/// Compile errors of a rules directory, each located.
pub type CompileErrors = Vec<RuleError>;

impl RuleSet {
    /// Compiles every `*.rhai` file in `dir` (sorted by name). Rules that do
    /// not compile are left out and reported; the others are usable.
    pub fn load(dir: &Path, known: Known) -> (Self, CompileErrors) {
        let engine = build_engine(known);
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
                .collect(),
            Err(e) => {
                errors.push(RuleError {
                    path: dir.to_owned(),
                    line: 0,
                    col: 0,
                    message: format!("cannot read the rules directory: {e}"),
                });
                Vec::new()
            }
        };
        paths.sort();
        let signatures = signatures(&engine);
        for path in paths {
            match std::fs::read_to_string(&path) {
                Ok(source) => match compile(&engine, &path, &source) {
                    Ok(rule) => rules.push(rule),
                    Err(e) => errors.push(e),
                },
                Err(e) => errors.push(RuleError {
                    path: path.clone(),
                    line: 0,
                    col: 0,
                    message: format!("cannot read: {e}"),
                }),
            }
        }
        (
            Self {
                engine,
                rules,
                generation: next_generation(),
                signatures,
            },
            errors,
        )
    }

    /// A rule set from in-memory sources `(id, source)`; for tests and fixtures.
    pub fn from_sources(sources: &[(&str, &str)], known: Known) -> Result<Self, RuleError> {
        let engine = build_engine(known);
        let rules = sources
            .iter()
            .map(|(id, src)| compile(&engine, &PathBuf::from(format!("rules/{id}.rhai")), src))
            .collect::<Result<Vec<_>, _>>()?;
        let signatures = signatures(&engine);
        Ok(Self {
            engine,
            rules,
            generation: next_generation(),
            signatures,
        })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule with this id.
    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// Keeps only the named rules (a schedule's subset).
    pub fn retain(&mut self, ids: &[String]) {
        self.rules.retain(|r| ids.contains(&r.id));
        self.generation = next_generation();
    }

    /// Evaluates rule `index` (of [`RuleSet::rules`]) for one customer,
    /// listing the facts it read (for `engaged explain`).
    pub fn explain(
        &self,
        index: usize,
        facts: &Arc<Facts>,
    ) -> (Result<Vec<PlannedAction>, RuleError>, Vec<String>) {
        let guard = ContextGuard::install(Arc::clone(facts), true);
        let mut scope = customer_scope(facts);
        self.evaluate_in(&guard, &mut scope, index, facts)
    }

    /// Runs rule `index` of this set with this thread's resolution cache
    /// for it (what `Engine::run_ast_with_scope` does, with a kept cache).
    fn run(
        &self,
        index: usize,
        scope: &mut Scope<'static>,
        ast: &AST,
    ) -> Result<(), Box<EvalAltResult>> {
        RESOLUTION_CACHES.with(|cell| {
            let mut cell = cell.borrow_mut();
            let (generation, caches) = &mut *cell;
            if *generation != self.generation || caches.len() != self.rules.len() {
                *generation = self.generation;
                *caches = (0..self.rules.len()).map(|_| rhai::Caches::new()).collect();
            }
            let mut global = self.engine.new_global_runtime_state();
            global.source = ast.source().map(Into::into);
            global.lib.push(ast.shared_lib().clone());
            global.embedded_module_resolver = ast.resolver().cloned();
            #[allow(deprecated)] // the one entry point that takes a kept cache
            self.engine
                .eval_statements_raw(&mut global, &mut caches[index], scope, ast.statements())
                .map(|_| ())
        })
    }

    /// Evaluates `rule` in the customer's scope (see [`customer_scope`]),
    /// leaving the scope as it found it.
    fn evaluate_in(
        &self,
        guard: &ContextGuard,
        scope: &mut Scope<'static>,
        index: usize,
        facts: &Facts,
    ) -> (Result<Vec<PlannedAction>, RuleError>, Vec<String>) {
        let rule = &self.rules[index];
        guard.start(&rule.id);
        let base = scope.len();
        // A bug in a native function must cost one evaluation, not the run.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run(index, scope, &rule.ast)
        }));
        if result.is_err() {
            // A panic may have left the rule's cache mid-change.
            RESOLUTION_CACHES.with(|c| c.borrow_mut().0 = 0);
        }
        scope.rewind(base);
        let planned = guard.take_planned();
        let reads = guard.take_reads();
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let error = RuleError {
                    path: rule.path.clone(),
                    line: 0,
                    col: 0,
                    message: format!(
                        "internal error while evaluating this rule (please report it): {what}"
                    ),
                };
                return (Err(error), reads);
            }
        };
        let outcome = match result {
            Ok(()) => Ok(planned
                .into_iter()
                .map(|kind| PlannedAction {
                    rule: rule.id.clone(),
                    customer_id: facts.customer.id.clone(),
                    kind,
                })
                .collect()),
            Err(e) => Err(runtime_error(&rule.path, &e, &self.signatures)),
        };
        (outcome, reads)
    }

    /// Evaluates every rule for one customer; one result per rule, in rule order.
    pub fn evaluate_all(&self, facts: &Arc<Facts>) -> Vec<Result<Vec<PlannedAction>, RuleError>> {
        self.evaluate_selected(facts, None)
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    /// Evaluates the rules named in `only` (all when `None`) for one customer.
    #[allow(clippy::type_complexity)]
    pub fn evaluate_selected(
        &self,
        facts: &Arc<Facts>,
        only: Option<&HashSet<String>>,
    ) -> Vec<(&Rule, Result<Vec<PlannedAction>, RuleError>)> {
        // One context and one scope for all the customer's rules: the
        // customer map is built once, and `customer` and `now` are constants,
        // so no rule can change what the next one sees.
        let guard = ContextGuard::install(Arc::clone(facts), false);
        let mut scope = customer_scope(facts);
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| only.is_none_or(|o| o.contains(&r.id)))
            .map(|(i, rule)| (rule, self.evaluate_in(&guard, &mut scope, i, facts).0))
            .collect()
    }

    /// The customer map rules see (for `explain`).
    pub fn customer_value(facts: &Facts) -> Dynamic {
        value::customer_to_dynamic(facts)
    }
}

/// Rhai answers `false` when a number is compared with `()` or a string
/// with `<`, `>`…, which hides missing data (`days_since("login") > 30` for a
/// customer who never logged in). These overloads make it an error that
/// says what was expected. `==` and `!=` with `()` stay allowed: that is how
/// rules test for missing data.
fn register_comparison_guards(engine: &mut Engine) {
    fn missing(op: &str) -> Box<EvalAltResult> {
        format!(
            "`{op}` compares a number with () (missing data, e.g. days_since of an event that never happened); test `x != ()` first"
        )
        .into()
    }
    fn text(op: &str) -> Box<EvalAltResult> {
        format!("`{op}` compares a number with a string; expected two numbers").into()
    }
    for op in ["<", "<=", ">", ">="] {
        engine.register_fn(
            op,
            move |_: i64, _: ()| -> Result<bool, Box<EvalAltResult>> { Err(missing(op)) },
        );
        engine.register_fn(
            op,
            move |_: (), _: i64| -> Result<bool, Box<EvalAltResult>> { Err(missing(op)) },
        );
        engine.register_fn(
            op,
            move |_: f64, _: ()| -> Result<bool, Box<EvalAltResult>> { Err(missing(op)) },
        );
        engine.register_fn(
            op,
            move |_: (), _: f64| -> Result<bool, Box<EvalAltResult>> { Err(missing(op)) },
        );
        engine.register_fn(
            op,
            move |_: i64, _: rhai::ImmutableString| -> Result<bool, Box<EvalAltResult>> {
                Err(text(op))
            },
        );
        engine.register_fn(
            op,
            move |_: rhai::ImmutableString, _: i64| -> Result<bool, Box<EvalAltResult>> {
                Err(text(op))
            },
        );
    }
}

/// The keys of the `customer` map (see `value::customer_to_dynamic`).
pub const CUSTOMER_KEYS: &[&str] = &[
    "id",
    "email",
    "name",
    "created_at",
    "timezone",
    "model",
    "owner",
    "traits",
    "tags",
];

/// The keys of the map `last(event)` returns (see `api.rs`).
pub const EVENT_KEYS: &[&str] = &["name", "at", "properties"];

/// Names rules may call that are handled by Rhai itself, not registered.
const KEYWORD_FUNCTIONS: &[&str] = &[
    "print",
    "debug",
    "type_of",
    "Fn",
    "call",
    "curry",
    "is_def_var",
    "is_def_fn",
    "is_shared",
];

/// Every function name a rule can call (the rule API, Rhai's standard library).
fn known_functions(engine: &Engine) -> HashSet<String> {
    let mut names: HashSet<String> = engine
        .gen_fn_signatures(true)
        .iter()
        .filter_map(|sig| sig.split('(').next())
        .map(|n| n.rsplit("::").next().unwrap_or(n).trim().to_owned())
        .collect();
    names.extend(KEYWORD_FUNCTIONS.iter().map(|s| (*s).to_owned()));
    names
}

/// The closest known name, when it is close enough to be a typo.
pub(crate) fn nearest<'a>(
    name: &str,
    known: impl Iterator<Item = &'a String>,
) -> Option<&'a String> {
    known
        .filter(|k| !k.contains('$') && k.chars().next().is_some_and(char::is_alphabetic))
        .map(|k| (strsim::levenshtein(name, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4) && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Calls to functions that exist nowhere (Rhai only notices at run time,
/// and only on the branch that runs): walked from the compiled script.
fn unknown_calls(engine: &Engine, path: &Path, ast: &AST) -> Vec<RuleError> {
    let mut known = known_functions(engine);
    known.extend(ast.iter_functions().map(|f| f.name.to_string()));
    let mut errors = Vec::new();
    ast.walk(&mut |nodes: &[rhai::ASTNode]| {
        if let Some(rhai::ASTNode::Expr(rhai::Expr::Dot(dot, _, _))) = nodes.last()
            && let rhai::Expr::Variable(var, ..) = &dot.lhs
            && var.1.as_str() == "customer"
            && let Some((name, pos)) = first_property(dot)
            && !CUSTOMER_KEYS.contains(&name)
        {
            let keys: Vec<String> = CUSTOMER_KEYS.iter().map(|k| (*k).to_owned()).collect();
            let hint = nearest(name, keys.iter())
                .map(|n| format!(" did you mean `{n}`?"))
                .unwrap_or_default();
            errors.push(located(
                path,
                pos,
                format!(
                    "customer has no property `{name}`;{hint} customer has: {} (other data is in customer.traits)",
                    CUSTOMER_KEYS.join(", ")
                ),
            ));
        }
        if let Some(rhai::ASTNode::Expr(rhai::Expr::FnCall(call, pos))) = nodes.last() {
            let name = call.name.as_str();
            let is_identifier = name
                .chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_alphanumeric() || c == '_');
            if is_identifier && call.namespace.is_empty() && !known.contains(name) {
                let hint = nearest(name, known.iter())
                    .map(|n| format!("; did you mean `{n}`?"))
                    .unwrap_or_default();
                errors.push(located(
                    path,
                    *pos,
                    format!("unknown function `{name}`{hint}"),
                ));
            }
        }
        true
    });
    errors
}

/// The first property of a `lhs.prop…` chain: `prop` and where it is.
fn first_property(dot: &rhai::BinaryExpr) -> Option<(&str, Position)> {
    match &dot.rhs {
        rhai::Expr::Property(p, pos) => Some((p.2.as_str(), *pos)),
        rhai::Expr::Dot(inner, ..) | rhai::Expr::Index(inner, ..) => match &inner.lhs {
            rhai::Expr::Property(p, pos) => Some((p.2.as_str(), *pos)),
            _ => None,
        },
        _ => None,
    }
}

fn is_call_to_last(e: &rhai::Expr) -> bool {
    matches!(e, rhai::Expr::FnCall(call, _) if call.name.as_str() == "last" && call.namespace.is_empty())
}

/// Properties `last(event)`'s map does not have, read straight from the
/// call (`last("x").score`) or from a variable only ever set from it
/// (`let answer = last("x"); answer.score`): Rhai would give `()` and the
/// rule would quietly never fire.
fn unknown_event_properties(path: &Path, ast: &AST) -> Vec<RuleError> {
    // Variables every declaration of which is `let v = last(…)`, never
    // assigned, and not a function parameter or loop variable.
    let mut from_last: HashMap<String, bool> = HashMap::new();
    for f in ast.iter_functions() {
        for p in &f.params {
            from_last.insert((*p).to_owned(), false);
        }
    }
    ast.walk(&mut |nodes: &[rhai::ASTNode]| {
        match nodes.last() {
            Some(rhai::ASTNode::Stmt(rhai::Stmt::Var(var, ..))) => {
                let ok = is_call_to_last(&var.1);
                from_last
                    .entry(var.0.name.to_string())
                    .and_modify(|v| *v &= ok)
                    .or_insert(ok);
            }
            Some(rhai::ASTNode::Stmt(rhai::Stmt::Assignment(a))) => {
                // `v = …` rebinds v; `v.x = …` adds to the map.
                let target = match &a.1.lhs {
                    rhai::Expr::Dot(dot, ..) | rhai::Expr::Index(dot, ..) => &dot.lhs,
                    other => other,
                };
                if let rhai::Expr::Variable(v, ..) = target {
                    from_last.insert(v.1.to_string(), false);
                }
            }
            Some(rhai::ASTNode::Stmt(rhai::Stmt::TryCatch(t, _))) => {
                if let rhai::Expr::Variable(v, ..) = &t.expr {
                    from_last.insert(v.1.to_string(), false);
                }
            }
            Some(rhai::ASTNode::Stmt(rhai::Stmt::For(f, _))) => {
                from_last.insert(f.0.name.to_string(), false);
                if let Some(counter) = &f.1 {
                    from_last.insert(counter.name.to_string(), false);
                }
            }
            _ => {}
        }
        true
    });
    let mut errors = Vec::new();
    ast.walk(&mut |nodes: &[rhai::ASTNode]| {
        if let Some(rhai::ASTNode::Expr(rhai::Expr::Dot(dot, _, _))) = nodes.last() {
            let is_event = is_call_to_last(&dot.lhs)
                || matches!(&dot.lhs, rhai::Expr::Variable(v, ..) if from_last.get(v.1.as_str()) == Some(&true));
            if is_event
                && let Some((name, pos)) = first_property(dot)
                && !EVENT_KEYS.contains(&name)
            {
                let keys: Vec<String> = EVENT_KEYS.iter().map(|k| (*k).to_owned()).collect();
                let hint = nearest(name, keys.iter()).map_or_else(
                    || format!(" the event's own data is in `.properties.{name}`;"),
                    |n| format!(" did you mean `{n}`?"),
                );
                errors.push(located(
                    path,
                    pos,
                    format!(
                        "last(…) gives #{{name, at, properties}}: no property `{name}`;{hint} it has: {}",
                        EVENT_KEYS.join(", ")
                    ),
                ));
            }
        }
        true
    });
    errors
}

/// Closures that capture variables. Rhai shares a captured variable between
/// the closure and its scope (behind a lock), which lets a rule tie values
/// into cycles that are never freed (memory that outlives the evaluation)
/// and stall on its own lock (Rhai waits 50 ms per attempt, time no CPU
/// budget sees). Closures that take everything as parameters are fine.
fn captures(path: &Path, ast: &AST) -> Vec<RuleError> {
    let mut errors = Vec::new();
    ast.walk(&mut |nodes: &[rhai::ASTNode]| {
        if let Some(rhai::ASTNode::Stmt(rhai::Stmt::Share(vars))) = nodes.last()
            && let Some((first, _)) = vars.first()
        {
            let names: Vec<String> = vars.iter().map(|(v, _)| format!("`{}`", v.name)).collect();
            let name = &first.name;
            errors.push(located(
                path,
                first.pos,
                format!(
                    "this closure captures {}; closures in rules cannot capture variables (a captured variable is shared, and shared values can form cycles that are never freed); pass it in as a parameter instead: `(|{name}, x| …).curry({name})`",
                    names.join(", ")
                ),
            ));
        }
        true
    });
    errors
}

/// Assignments into `customer` or `now` (`customer.traits.plan = "x"`):
/// they are constants that every rule of the run shares, and Rhai checks
/// only a plain `customer = …` at run time, not a change through a property
/// or an index.
fn writes_to_constants(path: &Path, ast: &AST) -> Vec<RuleError> {
    fn root(e: &rhai::Expr) -> Option<&str> {
        match e {
            rhai::Expr::Variable(var, ..) => Some(var.1.as_str()),
            rhai::Expr::Dot(x, ..) | rhai::Expr::Index(x, ..) => root(&x.lhs),
            _ => None,
        }
    }
    let mut errors = Vec::new();
    ast.walk(&mut |nodes: &[rhai::ASTNode]| {
        if let Some(rhai::ASTNode::Stmt(rhai::Stmt::Assignment(x))) = nodes.last()
            && let Some(name) = root(&x.1.lhs).filter(|n| ["customer", "now"].contains(n))
        {
            errors.push(located(
                path,
                x.1.lhs.position(),
                format!(
                    "`{name}` is read-only (every rule sees the same one); copy it first to change a copy: `let c = {name}; c… = …`"
                ),
            ));
        }
        true
    });
    errors
}

/// Rhai's parse error, with a hint where ours says more.
fn compile_message(message: String) -> String {
    if message.contains("'this' is disabled") {
        "`this` is not available in rules (a method changing `this` in place would slip past the nesting limit); write a function that takes the value and returns the new one".to_owned()
    } else {
        message
    }
}

fn compile(engine: &Engine, path: &Path, source: &str) -> Result<Rule, RuleError> {
    let id = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ast = engine
        .compile_with_scope(&base_scope(), source)
        .map_err(|e| located(path, e.1, compile_message(e.0.to_string())))?;
    let mut problems = unknown_calls(engine, path, &ast);
    problems.extend(captures(path, &ast));
    problems.extend(writes_to_constants(path, &ast));
    problems.extend(unknown_event_properties(path, &ast));
    if let Some(first) = problems.into_iter().min_by_key(|e| (e.line, e.col)) {
        return Err(first);
    }
    Ok(Rule {
        id,
        path: path.to_owned(),
        policy: directives(path, source)?,
        ast,
    })
}

fn located(path: &Path, pos: Position, message: String) -> RuleError {
    RuleError {
        path: path.to_owned(),
        line: pos.line().unwrap_or(0),
        col: pos.position().unwrap_or(0),
        message,
    }
}

/// Turns a Rhai runtime error into a located message with a hint for the
/// limits a rule author is most likely to hit.
fn runtime_error(
    path: &Path,
    err: &EvalAltResult,
    signatures: &std::collections::HashMap<String, Vec<String>>,
) -> RuleError {
    let inner = err.unwrap_inner();
    let pos = if inner.position().is_none() {
        err.position()
    } else {
        inner.position()
    };
    let message = match inner {
        EvalAltResult::ErrorTooManyOperations(..) => {
            format!("stopped after {MAX_OPERATIONS} operations (an endless loop?)")
        }
        EvalAltResult::ErrorDataTooLarge(what, ..) => format!(
            "{what} grew past the limit (strings {MAX_STRING_SIZE} bytes, arrays {MAX_ARRAY_SIZE} items, maps {MAX_MAP_SIZE} entries)"
        ),
        EvalAltResult::ErrorStackOverflow(..) => {
            format!("calls nested deeper than {MAX_CALL_LEVELS} levels (endless recursion?)")
        }
        EvalAltResult::ErrorRuntime(value, _) => value.to_string(),
        // Raised by the hooks in `build_engine` with their message.
        EvalAltResult::ErrorTerminated(message, _) => message.to_string(),
        EvalAltResult::ErrorDotExpr(what, _) if what.contains("Timestamp") => format!(
            "{}; a Timestamp has .year .month .day .hour .minute .weekday .unix",
            strip_position(what)
        ),
        EvalAltResult::ErrorFunctionNotFound(signature, _) => {
            let name = signature.split([' ', '(']).next().unwrap_or_default();
            let mut expected: Vec<&str> = signatures
                .get(name)
                .map(|v| v.iter().map(String::as_str).collect())
                .unwrap_or_default();
            expected.sort_unstable();
            expected.dedup();
            expected.truncate(6);
            if expected.is_empty() {
                format!("no function {signature}")
            } else {
                format!(
                    "no function {signature}: wrong argument types or count; expected {}",
                    expected.join(" or ")
                )
            }
        }
        other => strip_position(&other.to_string()),
    };
    located(path, pos, message)
}

/// Rhai appends " (line N, position M)" to messages; we print positions ourselves.
fn strip_position(s: &str) -> String {
    match s.rfind(" (line ") {
        Some(i) if s.ends_with(')') => s[..i].to_owned(),
        _ => s.to_owned(),
    }
}

/// Evaluation time helper for callers building facts.
pub fn now_value(now: DateTime<Utc>) -> Dynamic {
    Dynamic::from(Timestamp(now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Customer, CustomerId, EngagementModel};

    fn facts() -> Arc<Facts> {
        let now = DateTime::parse_from_rfc3339("2026-06-15T02:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let customer = Customer {
            id: CustomerId::parse("c1").unwrap(),
            email: None,
            name: None,
            created_at: Some(now),
            timezone: None,
            model: EngagementModel::LowTouch,
            owner: None,
            traits: serde_json::Map::new(),
        };
        Arc::new(Facts::new(customer, vec![], vec![], now))
    }

    /// Evaluates one rule for one customer: its actions, or its error.
    fn run(src: &str) -> Result<Vec<PlannedAction>, String> {
        let rules = RuleSet::from_sources(&[("r", src)], Known::default())
            .map_err(|e| format!("compile: {e}"))?;
        rules
            .evaluate_all(&facts())
            .remove(0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_rule_cannot_change_what_the_next_rule_sees() {
        for src in [
            "customer.traits.plan = \"gold\";",
            "customer[\"traits\"].plan += 1;",
            "now = 1;",
        ] {
            let e = RuleSet::from_sources(&[("w", src)], Known::default()).unwrap_err();
            assert!(e.message.contains("is read-only"), "{src}: {e}");
            assert_eq!(e.line, 1);
        }
        let rules = RuleSet::from_sources(
            &[
                ("a_pushes", "customer.tags.push(\"vip\");"),
                (
                    "b_copies",
                    "let c = customer; c.traits.plan = \"gold\"; c.tags.push(\"vip\");",
                ),
                ("c_shadows", "let customer = #{ tags: [\"vip\"] };"),
                (
                    "d_reads",
                    "if customer.traits.plan == () && customer.tags.len() == 0 { tag(\"clean\"); }",
                ),
            ],
            Known::default(),
        )
        .unwrap();
        for _ in 0..2 {
            let results = rules.evaluate_all(&facts());
            let e = results[0].as_ref().unwrap_err().to_string();
            assert!(e.contains("constant"), "{e}");
            assert!(results[1].is_ok(), "{:?}", results[1]);
            assert!(results[2].is_ok(), "{:?}", results[2]);
            let planned = results[3].as_ref().unwrap();
            assert_eq!(planned.len(), 1, "the last rule saw a changed customer");
        }
    }

    #[test]
    fn a_map_nested_past_the_depth_limit_fails_the_rule_where_it_is_read() {
        let e = run("let m = #{};\nfor i in 0..10000 {\n  m = #{ inner: m };\n}\n").unwrap_err();
        assert!(
            e.starts_with("rules/r.rhai:3:17: `m` holds arrays, maps or functions nested more than 64 levels deep"),
            "{e}"
        );
    }

    #[test]
    fn a_value_at_the_depth_limit_is_fine() {
        // 63 wraps of a map make 64 levels: the limit, not past it.
        let src = "let m = #{};\nfor i in 0..63 { m = [m]; }\nlet n = m;\nsend_email(\"x\", #{ ok: true });\n";
        assert_eq!(run(src).map(|a| a.len()), Ok(1));
    }

    #[test]
    fn nesting_through_a_function_is_caught_on_its_parameter() {
        let src = "fn wrap(x, n) { if n == 0 { x } else { wrap([x], n - 1) } }\nlet m = [];\nfor i in 0..100 { m = wrap(m, 30); }\n";
        let e = run(src).unwrap_err();
        // Located at the call that the failing parameter read is inside.
        assert!(
            e.starts_with("rules/r.rhai:3:23: `x` holds arrays, maps or functions nested"),
            "{e}"
        );
    }

    #[test]
    fn curried_functions_inside_each_other_count_as_nesting() {
        let src = "let f = |x| x;\nfor i in 0..10000 {\n  f = (|g, x| g.call(x)).curry(f);\n}\nf.call(1);\n";
        let e = run(src).unwrap_err();
        assert!(e.starts_with("rules/r.rhai:3:"), "{e}");
        assert!(
            e.contains("`f` holds arrays, maps or functions nested"),
            "{e}"
        );
    }

    #[test]
    fn curried_arguments_count_towards_the_item_limit() {
        // Curried arguments are copies: two of a 10,000-item array are
        // more than one value may hold.
        let src = "let a = [];\na.pad(10000, 0);\nlet f = |x, y, z| x;\nf = f.curry(a).curry(a);\nf.call(1);\n";
        let e = run(src).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "rules/r.rhai:5:1: `f` holds more than {MAX_ITEMS} items in all"
            )),
            "{e}"
        );
    }

    #[test]
    fn the_depth_limit_cannot_be_caught_with_try() {
        let src = "let m = #{};\nloop {\n  try { m = #{ inner: m }; } catch { }\n}\n";
        let e = run(src).unwrap_err();
        assert!(e.contains("nested more than 64 levels deep"), "{e}");
    }

    #[test]
    fn send_email_vars_deeper_than_the_limit_fail_the_call() {
        // The map read from `m` is within the limit; the vars wrap it once more.
        let src = "let m = 1;\nfor i in 0..64 { m = [m]; }\nsend_email(\"x\", #{ m: m });\n";
        let e = run(src).unwrap_err();
        assert!(
            e.starts_with("rules/r.rhai:3:1: send_email vars: arrays, maps or functions nested more than 64 levels deep"),
            "{e}"
        );
    }

    #[test]
    fn a_closure_that_captures_a_variable_does_not_compile_and_says_what_to_do() {
        let e = run("let f = || 1;\nfor i in 0..10 { let g = f; f = || g.call(); }\n").unwrap_err();
        assert!(
            e.starts_with("compile: rules/r.rhai:2:36: this closure captures `g`; closures in rules cannot capture variables"),
            "{e}"
        );
        assert!(e.contains("`(|g, x| …).curry(g)`"), "{e}");
    }

    #[test]
    fn closures_that_take_their_values_as_parameters_still_work() {
        let src = "let limit = 3;\nlet big = [1, 5, 7].filter((|limit, x| x > limit).curry(limit));\nif big == [5, 7] { send_email(\"x\"); }\n";
        assert_eq!(run(src).map(|a| a.len()), Ok(1));
    }

    #[test]
    fn methods_on_this_are_not_available() {
        let e =
            run("fn grow() { this.x = [this.x]; }\nlet m = #{ x: 1 };\nm.grow();\n").unwrap_err();
        assert!(
            e.starts_with("compile: rules/r.rhai:1:13: `this` is not available in rules"),
            "{e}"
        );
    }

    #[test]
    fn container_sized_work_is_stopped_by_the_cpu_budget_where_it_runs() {
        let src = "let a = [];\na.pad(10000, 0);\nloop {\n  a.contains(-1);\n}\n";
        let e = run(src).unwrap_err();
        assert!(
            e.starts_with("rules/r.rhai:4:")
                && e.contains(&format!(
                    "used more than {} ms of CPU time for customer c1",
                    CPU_BUDGET.as_millis()
                )),
            "{e}"
        );
    }

    #[test]
    fn comparing_big_arrays_in_a_loop_is_stopped_by_the_cpu_budget() {
        let src =
            "let a = [];\na.pad(10000, 0);\nlet b = a;\nlet n = 0;\nwhile a == b {\n  n += 1;\n}\n";
        let e = run(src).unwrap_err();
        assert!(e.contains("ms of CPU time"), "{e}");
    }

    #[test]
    fn the_cpu_budget_cannot_be_caught_with_try() {
        let src = "let m = #{};\nfor i in 0..9000 { m[`k${i}`] = i; }\nloop {\n  try { m.keys(); } catch { }\n}\n";
        let e = run(src).unwrap_err();
        assert!(e.contains("ms of CPU time"), "{e}");
    }
}
