use proptest::prelude::*;

use super::*;

fn tasks(ladders: &[usize]) -> Vec<Task> {
    ladders
        .iter()
        .enumerate()
        .map(|(i, &n)| Task::new(format!("t{i}"), "p", (0..n).map(|k| format!("ref {k}")).collect()))
        .collect()
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![Just(Outcome::Win), Just(Outcome::Tie), Just(Outcome::Loss), Just(Outcome::Unscored)]
}

fn rule() -> impl Strategy<Value = AdvanceRule> {
    prop_oneof![Just(AdvanceRule::Any), Just(AdvanceRule::Majority), Just(AdvanceRule::All)]
}

fn mode() -> impl Strategy<Value = CurriculumMode> {
    prop_oneof![
        Just(CurriculumMode::Dynamic),
        Just(CurriculumMode::StaticStrongest),
        Just(CurriculumMode::StaticWeakest)
    ]
}

/// Ladder lengths, then steps: each a list of (task index, outcomes of some rollouts).
fn scenario() -> impl Strategy<Value = (Vec<usize>, Vec<Vec<(usize, Vec<Outcome>)>>)> {
    prop::collection::vec(1usize..5, 1..7).prop_flat_map(|ladders| {
        let n = ladders.len();
        let entry = (0..n, prop::collection::vec(outcome(), 1..5));
        (Just(ladders), prop::collection::vec(prop::collection::vec(entry, 0..8), 1..25))
    })
}

fn levels(c: &Curriculum, n: usize) -> Vec<usize> {
    (0..n).map(|i| c.level(&format!("t{i}")).unwrap()).collect()
}

fn step_refs(step: &[(usize, Vec<Outcome>)]) -> Vec<(String, Vec<Outcome>)> {
    step.iter().map(|(i, o)| (format!("t{i}"), o.clone())).collect()
}

fn apply(c: &mut Curriculum, step: &[(String, Vec<Outcome>)]) -> CurriculumMetrics {
    c.advance(step.iter().map(|(id, o)| (id.as_str(), o.as_slice()))).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Dynamic mode: levels never decrease, rise by at most one per step, never pass the top; a
    /// task without a win in the step never moves; a task moves exactly when the rule says so
    /// and it is below the top; metrics agree with the levels.
    #[test]
    fn dynamic_steps_obey_the_ladder_rules((ladders, steps) in scenario(), rule in rule()) {
        let ts = tasks(&ladders);
        let cfg = CurriculumConfig { mode: CurriculumMode::Dynamic, advance_rule: rule };
        let mut c = Curriculum::new(&cfg, &ts).unwrap();
        prop_assert!(levels(&c, ts.len()).iter().all(|&l| l == 0));
        for step in &steps {
            let before = levels(&c, ts.len());
            let m = apply(&mut c, &step_refs(step));
            let after = levels(&c, ts.len());
            let mut moved = 0;
            for i in 0..ts.len() {
                let pooled: Vec<Outcome> = step.iter().filter(|(j, _)| *j == i).flat_map(|(_, o)| o.clone()).collect();
                let top = ladders[i] - 1;
                prop_assert!(after[i] >= before[i], "level decreased");
                prop_assert!(after[i] <= before[i] + 1, "rose by more than one");
                prop_assert!(after[i] <= top, "passed the top");
                if !pooled.contains(&Outcome::Win) {
                    prop_assert_eq!(after[i], before[i], "moved without a win: {:?}", pooled);
                }
                let should = before[i] < top && rule.moves(&pooled);
                prop_assert_eq!(after[i] == before[i] + 1, should);
                moved += usize::from(after[i] > before[i]);
            }
            prop_assert_eq!(m.advanced, moved);
            prop_assert_eq!(m.histogram.iter().sum::<usize>(), ts.len());
            for (l, &count) in m.histogram.iter().enumerate() {
                prop_assert_eq!(count, after.iter().filter(|&&x| x == l).count());
            }
            let at_top = (0..ts.len()).filter(|&i| after[i] == ladders[i] - 1).count();
            prop_assert_eq!(m.at_top, at_top);
            prop_assert!((m.share_at_top - at_top as f64 / ts.len() as f64).abs() < 1e-12);
        }
    }

    /// Ties, losses and unscored outcomes never move a level, whatever the rule or mode.
    #[test]
    fn no_win_never_moves(
        ladders in prop::collection::vec(1usize..5, 1..6),
        warmup in 0usize..4,
        outcomes in prop::collection::vec(prop_oneof![Just(Outcome::Tie), Just(Outcome::Loss), Just(Outcome::Unscored)], 1..6),
        rule in rule(), mode in mode(),
    ) {
        let ts = tasks(&ladders);
        let mut c = Curriculum::new(&CurriculumConfig { mode, advance_rule: rule }, &ts).unwrap();
        let wins: Vec<(String, Vec<Outcome>)> = ts.iter().map(|t| (t.id.clone(), vec![Outcome::Win])).collect();
        for _ in 0..warmup {
            apply(&mut c, &wins);
        }
        let before = c.state().clone();
        let step: Vec<(String, Vec<Outcome>)> = ts.iter().map(|t| (t.id.clone(), outcomes.clone())).collect();
        let m = apply(&mut c, &step);
        prop_assert_eq!(c.state(), &before);
        prop_assert_eq!(m.advanced, 0);
    }

    /// Save -> JSON -> load gives an identical state, and the restored curriculum behaves
    /// exactly like the original from then on.
    #[test]
    fn save_load_is_identical((ladders, steps) in scenario(), rule in rule(), mode in mode(), cut in 0usize..25) {
        let ts = tasks(&ladders);
        let cfg = CurriculumConfig { mode, advance_rule: rule };
        let mut a = Curriculum::new(&cfg, &ts).unwrap();
        let cut = cut.min(steps.len());
        for step in &steps[..cut] {
            apply(&mut a, &step_refs(step));
        }
        let saved = serde_json::to_vec(a.state()).unwrap();
        let state: CurriculumState = serde_json::from_slice(&saved).unwrap();
        prop_assert_eq!(&state, a.state());
        let mut b = Curriculum::restore(&cfg, &ts, state).unwrap();
        prop_assert_eq!(b.state(), a.state());
        for step in &steps[cut..] {
            let ma = apply(&mut a, &step_refs(step));
            let mb = apply(&mut b, &step_refs(step));
            prop_assert_eq!(ma, mb);
            prop_assert_eq!(levels(&a, ts.len()), levels(&b, ts.len()));
        }
        prop_assert_eq!(serde_json::to_vec(a.state()).unwrap(), serde_json::to_vec(b.state()).unwrap());
    }

    /// Static modes never move: the reference is always the strongest / the weakest.
    #[test]
    fn static_modes_are_fixed((ladders, steps) in scenario(), rule in rule(), strongest in any::<bool>()) {
        let ts = tasks(&ladders);
        let mode = if strongest { CurriculumMode::StaticStrongest } else { CurriculumMode::StaticWeakest };
        let mut c = Curriculum::new(&CurriculumConfig { mode, advance_rule: rule }, &ts).unwrap();
        for step in &steps {
            let m = apply(&mut c, &step_refs(step));
            prop_assert_eq!(m.advanced, 0);
            for (i, t) in ts.iter().enumerate() {
                let want = if strongest { ladders[i] - 1 } else { 0 };
                prop_assert_eq!(c.level(&t.id), Some(want));
                let want_text = format!("ref {want}");
                prop_assert_eq!(c.reference(t), Some(want_text.as_str()));
            }
            let top_share = if strongest { 1.0 } else {
                ladders.iter().filter(|&&n| n == 1).count() as f64 / ladders.len() as f64
            };
            prop_assert!((m.share_at_top - top_share).abs() < 1e-12);
        }
    }
}

#[test]
fn rules_count_only_scored_rollouts() {
    use Outcome::*;
    assert!(AdvanceRule::Any.moves(&[Loss, Win, Tie]));
    assert!(!AdvanceRule::Any.moves(&[Loss, Tie, Unscored]));
    assert!(AdvanceRule::Majority.moves(&[Win, Win, Loss]));
    assert!(!AdvanceRule::Majority.moves(&[Win, Loss]));
    assert!(AdvanceRule::Majority.moves(&[Win, Unscored, Unscored]));
    assert!(!AdvanceRule::Majority.moves(&[Win, Tie, Tie, Unscored]));
    assert!(AdvanceRule::All.moves(&[Win, Win, Unscored]));
    assert!(!AdvanceRule::All.moves(&[Win, Win, Tie]));
    assert!(!AdvanceRule::All.moves(&[Unscored, Unscored]));
}

#[test]
fn one_win_moves_one_level_and_the_top_stays() {
    let ts = tasks(&[3]);
    let mut c = Curriculum::new(&CurriculumConfig::default(), &ts).unwrap();
    assert_eq!(c.reference(&ts[0]), Some("ref 0"));
    // Four winning rollouts and the task listed twice: still one level.
    let w = [Outcome::Win, Outcome::Win];
    let m = c.advance([("t0", &w[..]), ("t0", &w[..])]).unwrap();
    assert_eq!((m.advanced, c.level("t0")), (1, Some(1)));
    c.advance([("t0", &w[..])]).unwrap();
    let m = c.advance([("t0", &w[..])]).unwrap();
    assert_eq!((m.advanced, c.level("t0"), m.at_top, m.histogram), (0, Some(2), 1, vec![0, 0, 1]));
    assert_eq!(c.reference(&ts[0]), Some("ref 2"));
}

#[test]
fn restore_refuses_a_mismatch() {
    let ts = tasks(&[2, 3]);
    let cfg = CurriculumConfig::default();
    let mut c = Curriculum::new(&cfg, &ts).unwrap();
    let w = [Outcome::Win];
    c.advance([("t1", &w[..])]).unwrap();
    let state = c.state().clone();
    let e = Curriculum::restore(&cfg, &tasks(&[2]), state.clone()).unwrap_err().to_string();
    assert!(e.contains("\"t1\"") && e.contains("not in the task file"), "{e}");
    let e = Curriculum::restore(&cfg, &tasks(&[2, 1]), state.clone()).unwrap_err().to_string();
    assert!(e.contains("past its top"), "{e}");
    let other = CurriculumConfig { mode: CurriculumMode::StaticWeakest, ..cfg.clone() };
    assert!(Curriculum::restore(&other, &ts, state.clone()).is_err());
    let e = c.advance([("nope", &w[..])]).unwrap_err().to_string();
    assert!(e.contains("unknown task"), "{e}");
    assert_eq!(c.state(), &state);
    assert!(Curriculum::new(&cfg, &tasks(&[2, 0])).is_err());
}
