//! Choosing a server for a task. Candidates are the pinned server, else the servers carrying any
//! of the task's tags, else every server; of those, the ones online, with a free slot, and — for a
//! tool call, when their tool list is known — offering the tool. The strategy picks among them.
//! When none qualifies the task waits (it is never failed for it) and the answer says why.

use mcpq_queue::{Call, Route, Strategy};
use rand::Rng;
use rustc_hash::FxHashSet;

/// What the router needs to know of one server.
#[derive(Clone, Copy, Debug)]
pub struct ServerView<'a> {
    /// Its configured name.
    pub name: &'a str,
    /// Its tags.
    pub tags: &'a [String],
    /// Its weight, for the priority strategy.
    pub weight: u32,
    /// Calls in flight now.
    pub in_flight: u32,
    /// Calls it may have in flight.
    pub max_concurrency: u32,
    /// Whether the health monitor counts it online (degraded servers are still used).
    pub online: bool,
    /// Its tool names, once listed (looked up for every task placed: FxHash, not SipHash).
    pub tools: Option<&'a FxHashSet<String>>,
}

impl ServerView<'_> {
    fn has_slot(&self) -> bool {
        self.in_flight < self.max_concurrency
    }

    fn offers(&self, call: &Call) -> bool {
        match (call, self.tools) {
            (Call::Tool { name, .. }, Some(tools)) => tools.contains(name),
            // unlisted tools, resources and prompts: the server's answer will tell
            _ => true,
        }
    }
}

/// Why a task cannot be placed now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The pinned server is not configured or not online.
    PinnedUnavailable,
    /// No online server among the candidates offers the tool.
    NoServerOffers,
    /// Servers qualify but every one is at its concurrency limit.
    AllBusy,
}

/// Picks servers; keeps the round-robin position between picks.
#[derive(Debug, Default)]
pub struct Router {
    next: usize,
}

impl Router {
    /// The index in `servers` to send the task to, or why it waits. `fallback` is the
    /// dispatcher's strategy, used when the task sets none.
    pub fn pick(
        &mut self,
        route: &Route,
        call: &Call,
        servers: &[ServerView<'_>],
        fallback: Strategy,
        rng: &mut impl Rng,
    ) -> Result<usize, Wait> {
        let candidate = |s: &ServerView<'_>| match (&route.server, route.tags.is_empty()) {
            (Some(pinned), _) => s.name == pinned,
            (None, false) => s.tags.iter().any(|t| route.tags.contains(t)),
            (None, true) => true,
        };
        let able: Vec<usize> = (0..servers.len())
            .filter(|&i| candidate(&servers[i]) && servers[i].online && servers[i].offers(call))
            .collect();
        if able.is_empty() {
            return Err(
                if route.server.is_some() && !servers.iter().any(|s| candidate(s) && s.online) {
                    Wait::PinnedUnavailable
                } else {
                    Wait::NoServerOffers
                },
            );
        }
        let free: Vec<usize> = able.into_iter().filter(|&i| servers[i].has_slot()).collect();
        if free.is_empty() {
            return Err(Wait::AllBusy);
        }
        let load = |i: usize| {
            // fraction of its slots in use, compared without floats
            let s = &servers[i];
            (u64::from(s.in_flight), u64::from(s.max_concurrency.max(1)))
        };
        let lighter = |a: usize, b: usize| {
            let ((fa, ma), (fb, mb)) = (load(a), load(b));
            (fa * mb).cmp(&(fb * ma)).then(fa.cmp(&fb)).then(a.cmp(&b))
        };
        Ok(match route.strategy.unwrap_or(fallback) {
            Strategy::RoundRobin => {
                // the first free server at or after the cursor, in configuration order
                let i = free.iter().copied().find(|&i| i >= self.next).unwrap_or(free[0]);
                self.next = i + 1;
                i
            }
            Strategy::LeastLoaded => {
                free.iter().copied().min_by(|&a, &b| lighter(a, b)).unwrap_or(free[0])
            }
            Strategy::Priority => free
                .iter()
                .copied()
                .min_by(|&a, &b| servers[b].weight.cmp(&servers[a].weight).then(lighter(a, b)))
                .unwrap_or(free[0]),
            Strategy::Random => free[rng.random_range(0..free.len())],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use serde_json::json;

    struct Fleet {
        tags: Vec<Vec<String>>,
        tools: Vec<Option<FxHashSet<String>>>,
        load: Vec<(u32, u32)>,
        weight: Vec<u32>,
        online: Vec<bool>,
    }

    const NAMES: [&str; 4] = ["a", "b", "c", "d"];

    impl Fleet {
        fn new() -> Self {
            Self {
                tags: vec![vec![], vec!["gpu".into()], vec!["gpu".into(), "eu".into()], vec![]],
                tools: vec![None; 4],
                load: vec![(0, 4); 4],
                weight: vec![1; 4],
                online: vec![true; 4],
            }
        }

        fn views(&self) -> Vec<ServerView<'_>> {
            (0..4)
                .map(|i| ServerView {
                    name: NAMES[i],
                    tags: &self.tags[i],
                    weight: self.weight[i],
                    in_flight: self.load[i].0,
                    max_concurrency: self.load[i].1,
                    online: self.online[i],
                    tools: self.tools[i].as_ref(),
                })
                .collect()
        }
    }

    fn echo() -> Call {
        Call::Tool { name: "echo".into(), arguments: json!({}) }
    }

    fn pick(f: &Fleet, route: &Route, strategy: Strategy) -> Result<usize, Wait> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        Router::default().pick(route, &echo(), &f.views(), strategy, &mut rng)
    }

    #[test]
    fn a_pinned_server_is_the_only_candidate() {
        let mut f = Fleet::new();
        let pinned = Route { server: Some("c".into()), ..Route::default() };
        assert_eq!(pick(&f, &pinned, Strategy::LeastLoaded), Ok(2));
        f.load[2] = (4, 4);
        assert_eq!(pick(&f, &pinned, Strategy::LeastLoaded), Err(Wait::AllBusy));
        f.online[2] = false;
        assert_eq!(pick(&f, &pinned, Strategy::LeastLoaded), Err(Wait::PinnedUnavailable));
        let unknown = Route { server: Some("zz".into()), ..Route::default() };
        assert_eq!(pick(&f, &unknown, Strategy::LeastLoaded), Err(Wait::PinnedUnavailable));
    }

    #[test]
    fn tags_narrow_the_candidates_to_servers_with_any_of_them() {
        let mut f = Fleet::new();
        let eu = Route { tags: vec!["eu".into(), "none".into()], ..Route::default() };
        assert_eq!(pick(&f, &eu, Strategy::RoundRobin), Ok(2));
        f.online[2] = false;
        assert_eq!(pick(&f, &eu, Strategy::RoundRobin), Err(Wait::NoServerOffers));
    }

    #[test]
    fn servers_that_listed_their_tools_must_offer_the_tool() {
        let mut f = Fleet::new();
        f.tools = vec![Some(FxHashSet::from_iter(["other".into()])); 4];
        f.tools[3] = Some(FxHashSet::from_iter(["echo".into()]));
        assert_eq!(pick(&f, &Route::default(), Strategy::RoundRobin), Ok(3));
        f.tools[3] = None;
        // a server whose tools are not listed yet may still be asked
        assert_eq!(pick(&f, &Route::default(), Strategy::RoundRobin), Ok(3));
        f.tools[3] = Some(FxHashSet::default());
        assert_eq!(pick(&f, &Route::default(), Strategy::RoundRobin), Err(Wait::NoServerOffers));
        // resources and prompts are not filtered by the tool list
        let read = Call::Resource { uri: "mem://x".into() };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let got = Router::default().pick(
            &Route::default(),
            &read,
            &f.views(),
            Strategy::RoundRobin,
            &mut rng,
        );
        assert_eq!(got, Ok(0));
    }

    #[test]
    fn round_robin_cycles_through_free_servers_in_order() {
        let mut f = Fleet::new();
        f.load[1] = (4, 4);
        let mut r = Router::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let picks: Vec<_> = (0..6)
            .map(|_| r.pick(&Route::default(), &echo(), &f.views(), Strategy::RoundRobin, &mut rng))
            .collect();
        assert_eq!(picks, [Ok(0), Ok(2), Ok(3), Ok(0), Ok(2), Ok(3)]);
    }

    #[test]
    fn least_loaded_compares_the_share_of_slots_in_use() {
        let mut f = Fleet::new();
        f.load = vec![(3, 4), (5, 10), (2, 2), (1, 2)];
        // 75 %, 50 %, full, 50 %: the tie goes to fewer calls in flight
        assert_eq!(pick(&f, &Route::default(), Strategy::LeastLoaded), Ok(3));
    }

    #[test]
    fn priority_takes_the_heaviest_free_server() {
        let mut f = Fleet::new();
        f.weight = vec![1, 9, 5, 9];
        f.load = vec![(0, 4), (4, 4), (0, 4), (1, 4)];
        assert_eq!(pick(&f, &Route::default(), Strategy::Priority), Ok(3));
        // a task's own strategy overrides the dispatcher's
        let own = Route { strategy: Some(Strategy::LeastLoaded), ..Route::default() };
        assert_eq!(pick(&f, &own, Strategy::Priority), Ok(0));
    }

    #[test]
    fn random_only_ever_picks_eligible_servers_and_reaches_each() {
        let mut f = Fleet::new();
        f.online[0] = false;
        f.load[3] = (4, 4);
        let mut r = Router::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let i =
                r.pick(&Route::default(), &echo(), &f.views(), Strategy::Random, &mut rng).unwrap();
            assert!(i == 1 || i == 2, "picked {i}");
            seen.insert(i);
        }
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn nothing_online_means_wait_not_fail() {
        let mut f = Fleet::new();
        f.online = vec![false; 4];
        assert_eq!(pick(&f, &Route::default(), Strategy::LeastLoaded), Err(Wait::NoServerOffers));
    }
}
