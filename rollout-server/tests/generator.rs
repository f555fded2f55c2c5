//! The generator's records: sampling parameters as configured, reward failures carried with
//! their message (never a silent 0), each distinct message reported once, truncation refused.

#![allow(clippy::unwrap_used)]

use model::candle_core::{quantized::gguf_file, DType, Device};
use model::{Architecture, Decoder, LayerPlan, ModelConfig, PlanSpec, Tokenizer, Weights};
use rewards::{RewardError, Sample, Score};
use rollout_server::dataset::{Dataset, Problem};
use rollout_server::{Generator, GeneratorConfig};

fn tokenizer() -> Tokenizer {
    let p = protocol::assets::cached_default_model().unwrap_or_else(|e| panic!("{e}"));
    let mut f = std::fs::File::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let ct = gguf_file::Content::read(&mut f).unwrap();
    Tokenizer::from_gguf(&ct).unwrap()
}

fn dataset() -> Dataset {
    Dataset::from_problems(
        (0..4)
            .map(|i| Problem {
                id: format!("p{i}"),
                question: format!("q{i}"),
                answer: i.to_string(),
                solution: None,
            })
            .collect(),
    )
    .unwrap()
}

fn config() -> GeneratorConfig {
    GeneratorConfig {
        prompts_per_batch: 2,
        group_size: 2,
        max_new_tokens: 3,
        temperature: 0.7,
        ..GeneratorConfig::default()
    }
}

#[test]
fn failed_rewards_are_carried_with_their_message_and_reported_once() {
    let tok = tokenizer();
    let cfg = ModelConfig::tiny(Architecture::Llama, tok.vocab_size(), 2);
    let w = Weights::random(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let m = Decoder::new(&cfg, &w, false).unwrap();
    // Every sample of an odd problem fails, with the same message.
    let reward = |s: &Sample| -> rewards::Result<Score> {
        if s.reference.parse::<u32>().unwrap() % 2 == 1 {
            Err(RewardError::Module("no checker for odd answers".into()))
        } else {
            Ok(Score::new(1.0))
        }
    };
    let mut g = Generator::new(
        config(),
        dataset(),
        PlanSpec::Explicit(LayerPlan::full(2)),
        2,
        Box::new(reward),
        tok,
    )
    .unwrap();
    let mut new_messages = Vec::new();
    let (mut failed, mut scored) = (0, 0);
    for _ in 0..2 {
        let b = g.next_batch(&m, 0).unwrap();
        // Every group is handed on (the learner drops the failed ones).
        assert_eq!(b.groups.len(), 2);
        new_messages.extend(b.stats.new_reward_failures.clone());
        for r in b.groups.iter().flatten() {
            assert_eq!(r.sampling, protocol::SamplingParams::temperature(0.7));
            assert_eq!(r.batch_groups, 2);
            match &r.reward.failure {
                Some(msg) => {
                    assert!(msg.contains("no checker for odd answers"), "{msg}");
                    assert_eq!(r.reward.value, 0.0);
                    failed += 1;
                }
                None => {
                    assert_eq!(r.reward.value, 1.0);
                    scored += 1;
                }
            }
        }
        assert_eq!(
            b.stats.reward_failures,
            b.groups
                .iter()
                .flatten()
                .filter(|r| r.reward.is_failed())
                .count()
        );
    }
    // Two batches of two problems cover the four problems: two odd, two even.
    assert_eq!((failed, scored), (4, 4));
    // One distinct message: reported once, counted four times.
    assert_eq!(new_messages.len(), 1, "{new_messages:?}");
    assert_eq!(g.reward_failures().get(&new_messages[0]), Some(&4));
}

#[test]
fn truncated_sampling_is_refused_for_training() {
    for cfg in [
        GeneratorConfig {
            top_p: 0.9,
            ..config()
        },
        GeneratorConfig {
            top_k: 40,
            ..config()
        },
    ] {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("truncated sampling cannot train"), "{err}");
    }
    assert!(config().validate().is_ok());
}
