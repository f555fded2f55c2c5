//! Behaviors of `bench rollout`: the `PLAN[@FORMAT]` text, its plan as a [`PlanChoice`] (the
//! type the plan flags and the config file use), and the plan it resolves to on a model.

use anyhow::{anyhow, bail, ensure, Context, Result};
use model::{
    LayerPlan, PlanChoice, PlanKeys, PlanSampler, PlanStrategy, Profile, SkipRatio, Unit,
    WeightFormat, CALIBRATED_WINDOW,
};
use std::str::FromStr;
use std::sync::Arc;

/// The behaviors measured when `--behaviors` is not given.
pub const DEFAULT_BEHAVIORS: &str = "full@q8_0,\
random:0.09,random:0.2,random:0.33,\
contiguous:0.09,contiguous:0.2,contiguous:0.33,\
calibrated:0.09,calibrated:0.2,calibrated:0.33,\
calibrated:0.09@q8_0,calibrated:0.2@q8_0,calibrated:0.33@q8_0";

/// One behavior: a plan choice and the storage of the linear weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Behavior {
    /// Which layers run: full, random, contiguous, calibrated or fixed units (a bench measures
    /// no adaptive behavior: it has no learner to steer it).
    pub plan: PlanChoice,
    /// The weight format.
    pub format: WeightFormat,
}

/// The plan's name in a behavior: `full`, `random`, `contiguous`, `calibrated` or `layers`.
pub fn plan_name(plan: &PlanChoice) -> &'static str {
    match plan {
        PlanChoice::Full => "full",
        PlanChoice::Nested {
            strategy: PlanStrategy::Contiguous,
            ..
        } => "contiguous",
        PlanChoice::Nested { .. } => "random",
        PlanChoice::Calibrated { .. } => "calibrated",
        PlanChoice::Adaptive { .. } => "adaptive",
        PlanChoice::Fixed(_) => "layers",
    }
}

/// What follows the colon: the ratio or the unit list (empty for `full`).
pub fn plan_argument(plan: &PlanChoice) -> String {
    let ratio = |r: &SkipRatio| match r {
        SkipRatio::Fixed(r) => r.to_string(),
        SkipRatio::Range { min, max } => format!("{min}-{max}"),
    };
    match plan {
        PlanChoice::Full => String::new(),
        PlanChoice::Nested { ratio: r, .. } | PlanChoice::Calibrated { ratio: r } => ratio(r),
        PlanChoice::Adaptive { kl_budget } => kl_budget.to_string(),
        PlanChoice::Fixed(u) => u.iter().map(Unit::to_string).collect::<Vec<_>>().join(","),
    }
}

impl Behavior {
    /// `PLAN@FORMAT`, e.g. `random:0.2@f32`.
    pub fn label(&self) -> String {
        match self.plan {
            PlanChoice::Full => format!("full@{}", self.format),
            _ => format!(
                "{}:{}@{}",
                plan_name(&self.plan),
                plan_argument(&self.plan),
                self.format
            ),
        }
    }

    /// The series of the plot: plan kind and weight format, e.g. `calibrated q8_0`.
    pub fn family(&self) -> String {
        format!("{} {}", plan_name(&self.plan), self.format)
    }
}

/// The plan kinds a behavior starts with.
const KINDS: [&str; 5] = ["full", "random", "contiguous", "calibrated", "layers"];
/// What a behavior looks like, for error messages.
const BEHAVIOR_FORMS: &str = "full, random:R, contiguous:R, calibrated:R or layers:U,U,... \
(U = 12, a12, m12), optionally followed by @f32, @q8_0 or @q4_0";

impl FromStr for Behavior {
    type Err = anyhow::Error;

    /// `PLAN[@FORMAT]`; the forms are listed in `BEHAVIOR_FORMS`.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let (plan_text, format) = match s.rsplit_once('@') {
            Some((p, f)) => (
                p.trim(),
                f.trim()
                    .parse::<WeightFormat>()
                    .map_err(|e| anyhow!("behavior `{s}`: {e}"))?,
            ),
            None => (s, WeightFormat::F32),
        };
        let (kind, arg) = match plan_text.split_once(':') {
            Some((k, a)) => (k.trim(), Some(a.trim())),
            None => (plan_text, None),
        };
        let ratio = |arg: Option<&str>| -> Result<f64> {
            let a = arg.filter(|a| !a.is_empty()).ok_or_else(|| {
                anyhow!("behavior `{s}`: `{kind}` needs a skip ratio, e.g. `{kind}:0.2`")
            })?;
            let r: f64 = a
                .parse()
                .map_err(|_| anyhow!("behavior `{s}`: the skip ratio `{a}` is not a number"))?;
            ensure!(
                r > 0.0 && r < 1.0,
                "behavior `{s}`: the skip ratio {r} must lie strictly between 0 and 1 (use \
                 `full` for no skipping)"
            );
            Ok(r)
        };
        let with_ratio = |strategy: PlanStrategy| -> Result<PlanKeys> {
            Ok(PlanKeys {
                skip_ratio: Some(ratio(arg)?),
                strategy: Some(strategy),
                ..PlanKeys::default()
            })
        };
        let keys = match kind {
            "full" => {
                ensure!(arg.is_none(), "behavior `{s}`: `full` takes no argument");
                PlanKeys::default()
            }
            "random" => with_ratio(PlanStrategy::Random)?,
            "contiguous" => with_ratio(PlanStrategy::Contiguous)?,
            "calibrated" => with_ratio(PlanStrategy::Calibrated)?,
            "layers" => {
                let a = arg.filter(|a| !a.is_empty()).ok_or_else(|| {
                    anyhow!("behavior `{s}`: `layers` needs the units to skip, e.g. `layers:25,a5`")
                })?;
                let units = a
                    .split(',')
                    .map(str::parse::<Unit>)
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| anyhow!("behavior `{s}`: {e}"))?;
                PlanKeys {
                    skip_layers: Some(units),
                    ..PlanKeys::default()
                }
            }
            "" => bail!("behavior `{s}` names no plan (expected {BEHAVIOR_FORMS})"),
            other => bail!("behavior `{s}`: unknown plan `{other}` (expected {BEHAVIOR_FORMS})"),
        };
        let plan = PlanChoice::from_keys(keys).with_context(|| format!("behavior `{s}`"))?;
        Ok(Self { plan, format })
    }
}

/// Parses a comma-separated behavior list. A `layers:` entry takes the following entries that
/// are units (`layers:4,10,a5,m7@q8_0,random:0.2` is two behaviors); its `@FORMAT`, if any,
/// comes after its last unit. A behavior listed twice is an error.
pub fn parse_behaviors(list: &str) -> Result<Vec<Behavior>> {
    let mut items: Vec<String> = Vec::new();
    for raw in list.split(',') {
        let t = raw.trim();
        ensure!(
            !t.is_empty(),
            "the behavior list `{list}` has an empty entry (expected {BEHAVIOR_FORMS})"
        );
        let head = t.split([':', '@']).next().unwrap_or("").trim();
        match items.last_mut() {
            Some(prev)
                if !KINDS.contains(&head) && prev.starts_with("layers:") && !prev.contains('@') =>
            {
                prev.push(',');
                prev.push_str(t);
            }
            _ => items.push(t.to_string()),
        }
    }
    let behaviors = items
        .iter()
        .map(|i| i.parse::<Behavior>())
        .collect::<Result<Vec<_>>>()?;
    for (i, b) in behaviors.iter().enumerate() {
        ensure!(
            !behaviors[..i].contains(b),
            "behavior `{}` is listed twice",
            b.label()
        );
    }
    Ok(behaviors)
}

/// A behavior with its plan resolved for the model.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The behavior.
    pub behavior: Behavior,
    /// The plan it runs.
    pub plan: LayerPlan,
    /// For a calibrated behavior: the KL the profile recorded for its set (f32 weights).
    pub profile_kl: Option<f64>,
}

/// The plan of `b` on a model of `num_layers` layers: the first plan a [`PlanSampler`] seeded
/// with `seed` draws for its choice, as training draws one per batch. A calibrated behavior
/// thus takes a set of the profile within [`CALIBRATED_WINDOW`] of the cost 1 − R (drawn among
/// them), else the nearest set, with a remark in `notes`.
pub fn resolve(
    b: Behavior,
    num_layers: usize,
    profile: Option<&Arc<Profile>>,
    seed: u64,
    notes: &mut Vec<String>,
) -> Result<Resolved> {
    let spec = b.plan.resolve(num_layers, profile.cloned())?;
    let plan = PlanSampler::new(spec, num_layers, seed)?.next_plan()?;
    let mut profile_kl = None;
    if let (PlanChoice::Calibrated { ratio }, Some(p)) = (&b.plan, profile) {
        let set = p
            .sets
            .iter()
            .find(|s| p.plan(s).is_ok_and(|sp| sp == plan))
            .context("the calibrated plan is none of the profile's sets")?;
        let target = match ratio {
            SkipRatio::Fixed(r) => 1.0 - r,
            SkipRatio::Range { min, max } => 1.0 - 0.5 * (min + max),
        };
        if (set.cost_ratio - target).abs() > CALIBRATED_WINDOW {
            notes.push(format!(
                "{}: the profile's nearest set costs {:.3}, not {:.3} (calibrate with a lower \
                 --min-cost-ratio to reach it)",
                b.label(),
                set.cost_ratio,
                target
            ));
        }
        profile_kl = Some(set.kl);
    }
    Ok(Resolved {
        behavior: b,
        plan,
        profile_kl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Behavior {
        s.parse().unwrap()
    }

    fn nested(r: f64, strategy: PlanStrategy) -> PlanChoice {
        PlanChoice::Nested {
            ratio: SkipRatio::Fixed(r),
            strategy,
        }
    }

    #[test]
    fn behaviors_parse_with_formats_and_unit_lists() {
        let list = parse_behaviors("full@q8_0, random:0.2,contiguous:0.33@f32,layers:4,10,a5,m7@q8_0,calibrated:0.09,layers:25")
            .unwrap();
        assert_eq!(
            list,
            vec![
                Behavior {
                    plan: PlanChoice::Full,
                    format: WeightFormat::Q8_0
                },
                Behavior {
                    plan: nested(0.2, PlanStrategy::Random),
                    format: WeightFormat::F32
                },
                Behavior {
                    plan: nested(0.33, PlanStrategy::Contiguous),
                    format: WeightFormat::F32
                },
                Behavior {
                    plan: PlanChoice::Fixed(vec![
                        Unit::Layer(4),
                        Unit::Layer(10),
                        Unit::Attn(5),
                        Unit::Mlp(7)
                    ]),
                    format: WeightFormat::Q8_0
                },
                Behavior {
                    plan: PlanChoice::Calibrated {
                        ratio: SkipRatio::Fixed(0.09)
                    },
                    format: WeightFormat::F32
                },
                Behavior {
                    plan: PlanChoice::Fixed(vec![Unit::Layer(25)]),
                    format: WeightFormat::F32
                },
            ]
        );
        assert_eq!(list[3].label(), "layers:4,10,a5,m7@q8_0");
        assert_eq!(list[3].family(), "layers q8_0");
        assert_eq!(list[1].label(), "random:0.2@f32");
        assert_eq!(list[0].label(), "full@q8_0");
        // Labels parse back to the same behavior.
        for x in &list {
            assert_eq!(&b(&x.label()), x);
        }
        assert_eq!(b("full@Q8").format, WeightFormat::Q8_0);
        assert_eq!(b("layers:25@q4_0").format, WeightFormat::Q4_0);
    }

    #[test]
    fn the_default_list_parses() {
        let list = parse_behaviors(DEFAULT_BEHAVIORS).unwrap();
        assert_eq!(list.len(), 13);
        assert_eq!(list[0].label(), "full@q8_0");
        let q8_calibrated = list
            .iter()
            .filter(|x| x.family() == "calibrated q8_0")
            .count();
        assert_eq!(q8_calibrated, 3);
    }

    #[test]
    fn bad_behaviors_are_clear_errors() {
        for (list, needle) in [
            ("randm:0.2", "unknown plan `randm`"),
            ("random", "needs a skip ratio"),
            ("random:", "needs a skip ratio"),
            ("random:abc", "`abc` is not a number"),
            ("random:1.5", "strictly between 0 and 1"),
            ("contiguous:0", "strictly between 0 and 1"),
            ("full:3", "takes no argument"),
            ("full@q7", "unknown weight format"),
            ("layers:", "needs the units"),
            ("layers:x5", "not a skip unit"),
            ("full,,random:0.2", "empty entry"),
            ("full,random:0.2,full@f32", "listed twice"),
            ("12", "unknown plan `12`"),
            ("@q8_0", "names no plan"),
            ("layers:4@q8_0,5", "unknown plan `5`"),
        ] {
            let e = format!("{:#}", parse_behaviors(list).unwrap_err());
            assert!(e.contains(needle), "{list}: {e}");
        }
    }

    #[test]
    fn a_calibrated_behavior_takes_the_plans_own_draw() {
        use model::SkipSet;
        let sets: Vec<SkipSet> = (1..=6)
            .map(|k| SkipSet {
                units: (1..=k).map(Unit::Layer).collect(),
                kl: 0.05 * k as f64,
                cost_ratio: 1.0 - 0.1 * k as f64,
            })
            .collect();
        let profile = Arc::new(Profile {
            num_layers: 8,
            sets,
            ..Profile::default()
        });
        let mut notes = Vec::new();
        let r = resolve(b("calibrated:0.2"), 8, Some(&profile), 0, &mut notes).unwrap();
        assert_eq!(r.plan.skipped(), vec![1, 2]);
        assert_eq!(r.profile_kl, Some(0.1));
        assert!(notes.is_empty(), "{notes:?}");
        // Beyond the profile's cheapest set: that set, with a note.
        let r = resolve(b("calibrated:0.9"), 8, Some(&profile), 0, &mut notes).unwrap();
        assert_eq!(r.plan.skipped().len(), 6);
        assert_eq!(notes.len(), 1, "{notes:?}");
        // Without a profile a calibrated behavior is an error, the others resolve.
        assert!(resolve(b("calibrated:0.2"), 8, None, 0, &mut notes).is_err());
        let r = resolve(b("layers:3,a5"), 8, None, 0, &mut notes).unwrap();
        assert_eq!(r.plan.skipped_units(), vec![Unit::Layer(3), Unit::Attn(5)]);
    }
}
