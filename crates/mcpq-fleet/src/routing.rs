//! Choosing a server for a task. Candidates are the pinned server, else the servers carrying any
//! of the task's tags, else every server; of those, the ones online, with a free slot, and — for a
//! tool call, when their tool list is known — offering the tool. The strategy picks among them.
//! When none qualifies the task waits (it is never failed for it) and the answer says why.

use mcpq_queue::{Call, Route, Strategy, Task};
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

    /// What a server offers is told by the call's tool alone: [`same_servers`] counts on it.
    fn offers(&self, call: &Call) -> bool {
        match (call, self.tools) {
            (Call::Tool { name, .. }, Some(tools)) => tools.contains(name),
            // unlisted tools, resources and prompts: the server's answer will tell
            _ => true,
        }
    }
}

/// Whether [`Router::pick`] finds the same servers able to take tasks `a` and `b` (it may still
/// pick different ones among them): the same route and, for tool calls, the same tool. Which
/// servers are able does not depend on their load, so while slots only fill, a task that found
/// every able server busy answers for the other.
pub(crate) fn same_servers(a: &Task, b: &Task) -> bool {
    a.route == b.route && tool(&a.call) == tool(&b.call)
}

fn tool(call: &Call) -> Option<&str> {
    match call {
        Call::Tool { name, .. } => Some(name),
        // servers list tools only: anything else goes to every candidate alike
        _ => None,
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
        let able = |s: &ServerView<'_>| candidate(s) && s.online && s.offers(call);
        // no vectors: a round asks this for every task it places
        let free = || (0..servers.len()).filter(|&i| able(&servers[i]) && servers[i].has_slot());
        let Some(first) = free().next() else {
            return Err(if servers.iter().any(able) {
                Wait::AllBusy
            } else if route.server.is_some() && !servers.iter().any(|s| candidate(s) && s.online) {
                Wait::PinnedUnavailable
            } else {
                Wait::NoServerOffers
            });
        };
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
                let i = free().find(|&i| i >= self.next).unwrap_or(first);
                self.next = i + 1;
                i
            }
            Strategy::LeastLoaded => free().min_by(|&a, &b| lighter(a, b)).unwrap_or(first),
            Strategy::Priority => free()
                .min_by(|&a, &b| servers[b].weight.cmp(&servers[a].weight).then(lighter(a, b)))
                .unwrap_or(first),
            Strategy::Random => {
                let n = free().count();
                free().nth(rng.random_range(0..n)).unwrap_or(first)
            }
        })
    }

    /// [`Self::pick`], with the server at `last_resort` (one that just refused the task
    /// undelivered) tried only when no other can take the task.
    pub fn pick_avoiding(
        &mut self,
        route: &Route,
        call: &Call,
        servers: &mut [ServerView<'_>],
        last_resort: Option<usize>,
        fallback: Strategy,
        rng: &mut impl Rng,
    ) -> Result<usize, Wait> {
        let Some(i) = last_resort else {
            return self.pick(route, call, servers, fallback, rng);
        };
        let online = std::mem::replace(&mut servers[i].online, false);
        let pick = self.pick(route, call, servers, fallback, rng);
        servers[i].online = online;
        match pick {
            Err(_) if online => self.pick(route, call, servers, fallback, rng),
            pick => pick,
        }
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

    #[test]
    fn a_server_picked_last_is_used_only_when_no_other_can_take_the_task() {
        let mut f = Fleet::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut r = Router::default();
        let (route, ll) = (Route::default(), Strategy::LeastLoaded);
        let mut views = f.views();
        assert_eq!(r.pick_avoiding(&route, &echo(), &mut views, Some(0), ll, &mut rng), Ok(1));
        assert!(views[0].online, "its view is given back as it was");
        f.load = vec![(0, 4), (4, 4), (4, 4), (4, 4)];
        let mut views = f.views();
        assert_eq!(r.pick_avoiding(&route, &echo(), &mut views, Some(0), ll, &mut rng), Ok(0));
        assert_eq!(r.pick_avoiding(&route, &echo(), &mut views, None, ll, &mut rng), Ok(0));
    }

    /// What a round counts on when it skips the pick: tasks with the same servers find those
    /// all busy together, however the fleet is loaded, listed and online.
    #[test]
    fn tasks_with_the_same_servers_find_them_busy_together() {
        let tool = |name: &str| Call::Tool { name: name.into(), arguments: json!({"n": name}) };
        let resource = |uri: &str| Call::Resource { uri: uri.into() };
        let routes = [
            Route::default(),
            Route { tags: vec!["gpu".into()], ..Route::default() },
            Route { server: Some("c".into()), ..Route::default() },
            Route { strategy: Some(Strategy::Random), ..Route::default() },
        ];
        let calls = [tool("echo"), tool("echo"), tool("sum"), resource("r://1"), resource("r://2")];
        let tasks: Vec<Task> = routes
            .iter()
            .flat_map(|r| calls.iter().map(move |c| (r.clone(), c.clone())))
            .map(|(route, call)| Task { route, call, ..crate::shared::tests::task(false) })
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut compared, mut told_apart) = (0, 0);
        for round in 0..200 {
            let mut f = Fleet::new();
            for i in 0..4 {
                f.load[i] = (rng.random_range(0..=2), 2);
                f.online[i] = rng.random_range(0..4) > 0;
                f.tools[i] = match (round + i) % 3 {
                    0 => None,
                    1 => Some(["echo".to_owned()].into_iter().collect()),
                    _ => Some(["echo".to_owned(), "sum".to_owned()].into_iter().collect()),
                };
            }
            let views = f.views();
            let busy: Vec<bool> = tasks
                .iter()
                .map(|t| {
                    let picked = Router::default().pick(
                        &t.route,
                        &t.call,
                        &views,
                        Strategy::RoundRobin,
                        &mut rng,
                    );
                    picked == Err(Wait::AllBusy)
                })
                .collect();
            for (a, ta) in tasks.iter().enumerate() {
                for (b, tb) in tasks.iter().enumerate() {
                    if same_servers(ta, tb) {
                        compared += 1;
                        assert_eq!(
                            busy[a], busy[b],
                            "{:?} / {:?} in {:?}",
                            ta.call, tb.call, f.load
                        );
                    } else if busy[a] != busy[b] {
                        told_apart += 1;
                    }
                }
            }
        }
        // the check compared pairs, and the pairs it keeps apart do differ
        assert!(compared > 0 && told_apart > 0, "{compared} compared, {told_apart} told apart");
        let echo = &tasks[0];
        assert!(same_servers(echo, &tasks[1]), "the same tool with other arguments");
        assert!(!same_servers(echo, &tasks[2]), "another tool");
        assert!(same_servers(&tasks[3], &tasks[4]), "resources go to every candidate alike");
        assert!(!same_servers(echo, &tasks[5]), "another route");
    }
}
