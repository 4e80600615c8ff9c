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

fn cfg(mode: CurriculumMode, advance_rule: AdvanceRule) -> CurriculumConfig {
    CurriculumConfig { mode, advance_rule, ..CurriculumConfig::default() }
}

fn k_of_m(mode: CurriculumMode, k: usize, m: usize) -> CurriculumConfig {
    CurriculumConfig { mode, advance_rule: AdvanceRule::KOfM, advance_k: Some(k), advance_window: Some(m) }
}

/// Every rule, k-of-m with 1 <= k <= m <= 4, as a config in `mode`.
fn any_rule(mode: CurriculumMode) -> impl Strategy<Value = CurriculumConfig> {
    prop_oneof![
        rule().prop_map(move |r| cfg(mode, r)),
        (1usize..5).prop_flat_map(|m| (1..=m, Just(m))).prop_map(move |(k, m)| k_of_m(mode, k, m)),
    ]
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
        let mut c = Curriculum::new(&cfg(CurriculumMode::Dynamic, rule), &ts).unwrap();
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
        cfg in mode().prop_flat_map(any_rule),
    ) {
        let ts = tasks(&ladders);
        let mut c = Curriculum::new(&cfg, &ts).unwrap();
        let wins: Vec<(String, Vec<Outcome>)> = ts.iter().map(|t| (t.id.clone(), vec![Outcome::Win; 4])).collect();
        for _ in 0..warmup {
            apply(&mut c, &wins);
        }
        let before = c.state().clone();
        let step: Vec<(String, Vec<Outcome>)> = ts.iter().map(|t| (t.id.clone(), outcomes.clone())).collect();
        let m = apply(&mut c, &step);
        prop_assert_eq!(&c.state().levels, &before.levels);
        prop_assert_eq!(m.advanced, 0);
        if cfg.advance_rule != AdvanceRule::KOfM {
            prop_assert_eq!(c.state(), &before);
        }
    }

    /// Save -> JSON -> load gives an identical state, and the restored curriculum behaves
    /// exactly like the original from then on.
    #[test]
    fn save_load_is_identical((ladders, steps) in scenario(), cfg in mode().prop_flat_map(any_rule), cut in 0usize..25) {
        let ts = tasks(&ladders);
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
            prop_assert_eq!(a.state(), b.state());
        }
        prop_assert_eq!(serde_json::to_vec(a.state()).unwrap(), serde_json::to_vec(b.state()).unwrap());
    }

    /// Static modes never move: the reference is always the strongest / the weakest.
    #[test]
    fn static_modes_are_fixed(
        (ladders, steps) in scenario(),
        (strongest, cfg) in any::<bool>().prop_flat_map(|s| {
            let mode = if s { CurriculumMode::StaticStrongest } else { CurriculumMode::StaticWeakest };
            (Just(s), any_rule(mode))
        }),
    ) {
        let ts = tasks(&ladders);
        let mut c = Curriculum::new(&cfg, &ts).unwrap();
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
        prop_assert!(c.state().windows.is_empty());
    }

    /// k-of-m against a model written from the rule's words: each task's scored outcomes at its
    /// current level enter a window of the last m; the task moves when the window holds k wins,
    /// the window then empties and the rest of the step (judged against the old level) is
    /// dropped; at the top nothing is kept. Levels, windows and metrics agree after every step;
    /// the ladder invariants hold.
    #[test]
    fn k_of_m_matches_its_model((ladders, steps) in scenario(), (k, m) in (1usize..5).prop_flat_map(|m| (1..=m, Just(m)))) {
        let ts = tasks(&ladders);
        let mut c = Curriculum::new(&k_of_m(CurriculumMode::Dynamic, k, m), &ts).unwrap();
        let mut model_levels = vec![0usize; ts.len()];
        let mut model_windows: Vec<Vec<Outcome>> = vec![Vec::new(); ts.len()];
        for step in &steps {
            let before = levels(&c, ts.len());
            let mut moved = 0;
            for i in 0..ts.len() {
                let top = ladders[i] - 1;
                if model_levels[i] == top {
                    continue;
                }
                let pooled = step.iter().filter(|(j, _)| *j == i).flat_map(|(_, o)| o.iter().copied());
                for o in pooled.filter(|o| *o != Outcome::Unscored) {
                    let w = &mut model_windows[i];
                    w.push(o);
                    if w.len() > m {
                        w.remove(0);
                    }
                    if w.iter().filter(|o| **o == Outcome::Win).count() >= k {
                        model_levels[i] += 1;
                        moved += 1;
                        w.clear();
                        break;
                    }
                }
            }
            let mm = apply(&mut c, &step_refs(step));
            let after = levels(&c, ts.len());
            prop_assert_eq!(&after, &model_levels);
            prop_assert_eq!(mm.advanced, moved);
            for i in 0..ts.len() {
                prop_assert!(after[i] >= before[i] && after[i] <= before[i] + 1 && after[i] < ladders[i]);
                let got: Vec<Outcome> = c.window(&format!("t{i}")).map(|w| w.outcomes().collect()).unwrap_or_default();
                prop_assert_eq!(&got, &model_windows[i]);
                prop_assert!(got.len() <= m && got.iter().filter(|o| **o == Outcome::Win).count() < k);
            }
            prop_assert!(c.state().windows.values().all(|w| !w.is_empty()), "an empty window is not stored");
        }
    }
}

fn win_steps(c: &mut Curriculum, id: &str, outcomes: &[Outcome]) -> Vec<usize> {
    outcomes.iter().map(|o| c.advance([(id, std::slice::from_ref(o))]).unwrap().advanced).collect()
}

fn window_text(c: &Curriculum, id: &str) -> String {
    c.window(id).cloned().map(String::from).unwrap_or_default()
}

#[test]
fn k_of_m_moves_at_the_kth_win_in_the_window_across_steps() {
    use Outcome::*;
    let ts = tasks(&[4]);
    let mut c = Curriculum::new(&k_of_m(CurriculumMode::Dynamic, 3, 4), &ts).unwrap();
    // One comparison per step: the third win in the last four moves it, not before.
    assert_eq!(win_steps(&mut c, "t0", &[Win, Tie, Win, Loss, Win]), [0, 0, 0, 0, 0]);
    // The first win has left the window: T W L W holds two.
    assert_eq!(window_text(&c, "t0"), "TWLW");
    assert_eq!(c.level("t0"), Some(0));
    // Unscored comparisons are not counted and push nothing out.
    assert_eq!(win_steps(&mut c, "t0", &[Unscored, Unscored]), [0, 0]);
    assert_eq!(window_text(&c, "t0"), "TWLW");
    // W L W W: the third win in the window.
    assert_eq!(win_steps(&mut c, "t0", &[Win]), [1]);
    assert_eq!((c.level("t0"), c.window("t0")), (Some(1), None));
    // The window is empty at the new level: the wins before do not count.
    assert_eq!(win_steps(&mut c, "t0", &[Win, Win]), [0, 0]);
    assert_eq!(window_text(&c, "t0"), "WW");
    assert_eq!(win_steps(&mut c, "t0", &[Win]), [1]);
    assert_eq!(c.level("t0"), Some(2));
}

#[test]
fn k_of_m_moves_one_level_per_step_and_drops_the_rest_of_the_step() {
    use Outcome::*;
    let ts = tasks(&[4, 3]);
    let mut c = Curriculum::new(&k_of_m(CurriculumMode::Dynamic, 2, 3), &ts).unwrap();
    // Six wins in one step, t0 listed twice: one level, and the wins after the second are not
    // carried to the new level (they were judged against the old one).
    let w = [Win, Win, Win];
    let m = c.advance([("t0", &w[..]), ("t1", &[Loss, Win][..]), ("t0", &w[..])]).unwrap();
    assert_eq!((m.advanced, c.level("t0"), c.window("t0")), (1, Some(1), None));
    assert_eq!((c.level("t1"), window_text(&c, "t1")), (Some(0), "LW".to_string()));
    // Entries are read in order: t1's window L W + W (second win) moves it; the trailing loss is dropped.
    let m = c.advance([("t1", &[Win, Loss][..])]).unwrap();
    assert_eq!((m.advanced, c.level("t1"), c.window("t1")), (1, Some(1), None));
    // At the top nothing is kept.
    c.advance([("t1", &[Win, Win][..])]).unwrap();
    assert_eq!(c.level("t1"), Some(2));
    c.advance([("t1", &[Win, Loss][..])]).unwrap();
    assert_eq!((c.level("t1"), c.window("t1")), (Some(2), None));
}

#[test]
fn k_of_m_never_moves_on_ties() {
    use Outcome::*;
    let ts = tasks(&[3]);
    // k = 1 of m = 1: the most eager k-of-m; still only a win moves it.
    let mut c = Curriculum::new(&k_of_m(CurriculumMode::Dynamic, 1, 1), &ts).unwrap();
    // A `both`-order disagreement is a tie outcome.
    let both_disagree: Outcome = Some(crate::reward::Outcome::Tie).into();
    assert_eq!(both_disagree, Tie);
    for _ in 0..20 {
        assert_eq!(c.advance([("t0", &[Tie, both_disagree, Loss, Unscored][..])]).unwrap().advanced, 0);
    }
    assert_eq!(c.level("t0"), Some(0));
    assert_eq!(window_text(&c, "t0"), "L");
    assert_eq!(c.advance([("t0", &[Tie, Win, Tie][..])]).unwrap().advanced, 1);
    // 3 of 3: two wins and a tie in the window do not move it; the tie leaves only when pushed out.
    let mut c = Curriculum::new(&k_of_m(CurriculumMode::Dynamic, 3, 3), &ts).unwrap();
    assert_eq!(win_steps(&mut c, "t0", &[Win, Tie, Win, Unscored, Win]), [0, 0, 0, 0, 0]);
    assert_eq!(window_text(&c, "t0"), "TWW");
    assert_eq!(win_steps(&mut c, "t0", &[Win]), [1]);
}

#[test]
fn state_json_of_the_per_step_rules_is_unchanged_and_old_states_read() {
    let ts = tasks(&[2, 3]);
    let mut c = Curriculum::new(&CurriculumConfig::default(), &ts).unwrap();
    c.advance([("t1", &[Outcome::Win][..])]).unwrap();
    // The form saved before k-of-m existed, byte for byte.
    let old = r#"{"mode":"dynamic","advance_rule":"any","levels":{"t0":0,"t1":1}}"#;
    assert_eq!(serde_json::to_string(c.state()).unwrap(), old);
    let read: CurriculumState = serde_json::from_str(old).unwrap();
    assert_eq!(&read, c.state());
    assert!(Curriculum::restore(&CurriculumConfig::default(), &ts, read).is_ok());
    // The config too: unset k and m are not written (the config hash does not change).
    let v = serde_json::to_value(CurriculumConfig::default()).unwrap();
    assert_eq!(v, serde_json::json!({"mode": "dynamic", "advance_rule": "any"}));
}

#[test]
fn k_of_m_state_round_trips_through_json() {
    use Outcome::*;
    let ts = tasks(&[3, 2, 4]);
    let cfg = k_of_m(CurriculumMode::Dynamic, 3, 4);
    let mut a = Curriculum::new(&cfg, &ts).unwrap();
    a.advance([("t0", &[Win, Tie][..]), ("t1", &[Win, Win, Win][..]), ("t2", &[Loss, Unscored, Win][..])]).unwrap();
    let json = serde_json::to_string(a.state()).unwrap();
    assert_eq!(
        json,
        r#"{"mode":"dynamic","advance_rule":"k-of-m","advance_k":3,"advance_window":4,"levels":{"t0":0,"t1":1,"t2":0},"windows":{"t0":"WT","t2":"LW"}}"#
    );
    // Read back as a checkpoint's trainer.json gives it to a resume (serde, as here).
    let read: CurriculumState = serde_json::from_str(&json).unwrap();
    assert_eq!(&read, a.state());
    let mut b = Curriculum::restore(&cfg, &ts, read).unwrap();
    for step in [[Win, Win], [Loss, Win], [Win, Tie]] {
        let (ma, mb) = (a.advance([("t0", &step[..]), ("t2", &step[..])]).unwrap(), b.advance([("t0", &step[..]), ("t2", &step[..])]).unwrap());
        assert_eq!(ma, mb);
        assert_eq!(a.state(), b.state());
    }
    assert_eq!(serde_json::to_vec(a.state()).unwrap(), serde_json::to_vec(b.state()).unwrap());
}

#[test]
fn restore_refuses_k_of_m_mismatches() {
    let ts = tasks(&[3, 2]);
    let kcfg = k_of_m(CurriculumMode::Dynamic, 2, 3);
    let mut c = Curriculum::new(&kcfg, &ts).unwrap();
    c.advance([("t0", &[Outcome::Win][..])]).unwrap();
    let state = c.state().clone();
    assert!(Curriculum::restore(&kcfg, &ts, state.clone()).is_ok());
    // Another k or m, or another rule.
    let e = Curriculum::restore(&k_of_m(CurriculumMode::Dynamic, 2, 4), &ts, state.clone()).unwrap_err().to_string();
    assert!(e.contains("advance_window 3") && e.contains("4"), "{e}");
    assert!(Curriculum::restore(&cfg(CurriculumMode::Dynamic, AdvanceRule::Any), &ts, state.clone()).is_err());
    // Windows that advance could not have left.
    let bad = |w: &str, id: &str| {
        let mut s = state.clone();
        s.windows.insert(id.into(), serde_json::from_value(serde_json::json!(w)).unwrap());
        Curriculum::restore(&kcfg, &ts, s).unwrap_err().to_string()
    };
    assert!(bad("LLLL", "t0").contains("cannot come from 2-of-3"));
    assert!(bad("WW", "t0").contains("cannot come from 2-of-3"));
    assert!(bad("", "t0").contains("cannot come from"));
    let mut top = state.clone();
    top.levels.insert("t1".into(), 1);
    top.windows.insert("t1".into(), serde_json::from_value(serde_json::json!("W")).unwrap());
    assert!(Curriculum::restore(&kcfg, &ts, top).is_err(), "a window at the top");
    assert!(bad("W", "nope").contains("no saved level"));
    assert!(serde_json::from_value::<Window>(serde_json::json!("WX")).is_err());
    // A window saved with a per-step rule.
    let mut any = Curriculum::new(&cfg(CurriculumMode::Dynamic, AdvanceRule::Any), &ts).unwrap().state().clone();
    any.windows.insert("t0".into(), serde_json::from_value(serde_json::json!("L")).unwrap());
    let e = Curriculum::restore(&cfg(CurriculumMode::Dynamic, AdvanceRule::Any), &ts, any).unwrap_err().to_string();
    assert!(e.contains("k-of-m window"), "{e}");
}

#[test]
fn bad_k_of_m_config_is_refused_naming_the_key() {
    // The section as `Config` reads and checks it (the whole-file path is in tests/it/cli.rs's
    // config checks; this module must not depend on `config`).
    let load = |curriculum: &str| -> Result<CurriculumConfig, String> {
        let c: CurriculumConfig = toml::from_str(curriculum).map_err(|e| e.to_string())?;
        let mut p = crate::validate::Problems::default();
        c.validate("curriculum", &mut p);
        if p.0.is_empty() {
            Ok(c)
        } else {
            Err(p.0.join("\n"))
        }
    };
    let ok = load("advance_rule = \"k-of-m\"\nadvance_k = 3\nadvance_window = 4").unwrap();
    assert_eq!(ok, k_of_m(CurriculumMode::Dynamic, 3, 4));
    for (toml, key, words) in [
        ("advance_rule = \"k-of-m\"\nadvance_k = 5\nadvance_window = 4", "curriculum.advance_k", "must be <= curriculum.advance_window (4), got 5"),
        ("advance_rule = \"k-of-m\"\nadvance_k = 0\nadvance_window = 4", "curriculum.advance_k", "must be >= 1, got 0"),
        ("advance_rule = \"k-of-m\"\nadvance_k = 0\nadvance_window = 0", "curriculum.advance_window", "must be >= 1, got 0"),
        ("advance_rule = \"k-of-m\"\nadvance_window = 4", "curriculum.advance_k", "required with curriculum.advance_rule = \"k-of-m\""),
        ("advance_rule = \"k-of-m\"\nadvance_k = 2", "curriculum.advance_window", "required"),
        ("advance_rule = \"majority\"\nadvance_k = 2", "curriculum.advance_k", "only applies with curriculum.advance_rule = \"k-of-m\", not \"majority\""),
        ("advance_window = 2", "curriculum.advance_window", "only applies with"),
    ] {
        let e = load(toml).unwrap_err();
        assert!(e.contains(&format!("{key}: {words}")), "{toml}: {e}");
    }
    // Curriculum::new refuses the same configs on its own.
    let bad = CurriculumConfig { advance_k: Some(3), advance_window: Some(2), ..k_of_m(CurriculumMode::Dynamic, 1, 1) };
    let e = Curriculum::new(&bad, &tasks(&[2])).unwrap_err().to_string();
    assert!(e.contains("curriculum.advance_k"), "{e}");
}

/// The measurement issue 22 asks for: false moves under a random judge and the steps a climb
/// takes under a real one, for each rule. Prints the table (`-- --nocapture`); asserts what must
/// hold whatever the seed.
#[test]
fn promotion_rules_under_simulated_judges() {
    let rows = sim::measure(22).unwrap();
    println!("{}", sim::table(&rows));
    assert_eq!(rows, sim::measure(22).unwrap(), "seeded: the same numbers every time");
    let row = |rule: &str, n: usize| rows.iter().find(|r| r.rule == rule && r.n == n).unwrap();
    let (any4, kofm4, any1, kofm1) = (row("any", 4), row("k-of-m 3/4", 4), row("any", 1), row("k-of-m 3/4", 1));
    // Under a random judge k-of-m moves far less often than any.
    for (a, k) in [(any4, kofm4), (any1, kofm1)] {
        assert!(k.false_uniform * 3.0 < a.false_uniform, "{k:?} vs {a:?}");
        assert!(k.false_coin * 2.0 < a.false_coin, "{k:?} vs {a:?}");
    }
    // "any" with 4 rollouts: 1 - (2/3)^4 per step of 4 comparisons = 20.06 per 100.
    assert!((any4.false_uniform - 100.0 * (1.0 - (2.0f64 / 3.0).powi(4)) / 4.0).abs() < 1.0, "{any4:?}");
    // Everyone climbs a beaten ladder; one level per step at most: 3 steps at best.
    for r in &rows {
        assert!(r.beaten.stuck == 0 && r.learning.stuck == 0, "{r:?}");
        assert!(r.beaten.mean_steps >= 3.0, "{r:?}");
    }
    // k-of-m climbs slower than any but makes fewer premature moves while the policy learns.
    for (a, k) in [(any4, kofm4), (any1, kofm1)] {
        assert!(k.beaten.mean_steps >= a.beaten.mean_steps, "{k:?} vs {a:?}");
        assert!(k.learning.premature < a.learning.premature, "{k:?} vs {a:?}");
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

/// `reward.reference = "group"`: tasks without references are accepted, wins never move a level,
/// nothing counts as at its top, and a restore keeps the saved levels as they were. The ladder
/// still refuses a task without references.
#[test]
fn group_reference_turns_the_curriculum_off() {
    let ts = tasks(&[0, 3, 0]);
    let e = format!("{:#}", Curriculum::new(&CurriculumConfig::default(), &ts).unwrap_err());
    assert!(e.contains("\"t0\" has no references"), "{e}");
    let cfg = CurriculumConfig::default();
    let mut c = Curriculum::new_for(&cfg, &ts, Reference::Group).unwrap();
    let w = [Outcome::Win, Outcome::Win];
    for _ in 0..3 {
        let m = c.advance([("t0", &w[..]), ("t1", &w[..]), ("t2", &w[..])]).unwrap();
        assert_eq!((m.advanced, m.at_top, m.histogram.clone()), (0, 0, vec![3, 0, 0]));
    }
    assert_eq!((c.level("t0"), c.level("t1"), c.reference(&ts[0])), (Some(0), Some(0), None));
    assert!(c.advance([("nope", &w[..])]).is_err());
    // A ladder run's levels, resumed in group mode: kept, never moved.
    let with_refs = tasks(&[2, 3]);
    let mut ladder = Curriculum::new(&cfg, &with_refs).unwrap();
    ladder.advance([("t1", &w[..])]).unwrap();
    let mut off = Curriculum::restore_for(&cfg, &with_refs, ladder.state().clone(), Reference::Group).unwrap();
    off.advance([("t0", &w[..]), ("t1", &w[..])]).unwrap();
    assert_eq!(off.state().levels, ladder.state().levels);
    assert_eq!((off.level("t0"), off.level("t1")), (Some(0), Some(1)));
}
