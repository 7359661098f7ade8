//! The simulated agent forest: sessions with their parent, user and
//! authority, and which receivers each session touches. Deterministic from a
//! seed, so a drill can be repeated exactly.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// How an agent session acts (the hub's `authority` extension member).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthorityKind {
    /// Acts for a person.
    Delegated,
    /// Acts for a workflow within fixed bounds.
    Bounded,
    /// Acts on its own.
    Autonomous,
}

/// Parameters of a forest.
#[derive(Debug, Clone, PartialEq)]
pub struct ForestParams {
    /// Sessions in total.
    pub sessions: usize,
    /// Depth of each tree (0: roots only).
    pub depth: usize,
    /// Children per session above the last level.
    pub fanout: usize,
    /// Receivers (relying parties).
    pub receivers: usize,
    /// Distinct receivers each session touches (capped at `receivers`).
    pub touches_per_session: usize,
    /// Relative shares of delegated, bounded and autonomous sessions.
    pub authority_shares: [f64; 3],
    /// Distinct users owning the trees (a tree belongs to one user).
    pub users: usize,
    /// Seed of the deterministic generator.
    pub seed: u64,
}

impl Default for ForestParams {
    fn default() -> Self {
        ForestParams {
            sessions: 100,
            depth: 3,
            fanout: 3,
            receivers: 4,
            touches_per_session: 2,
            authority_shares: [0.5, 0.3, 0.2],
            users: 4,
            seed: 1,
        }
    }
}

/// One simulated agent session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    /// Its id (opaque session subject).
    pub id: String,
    /// Index of its parent in [`Forest::sessions`].
    pub parent: Option<usize>,
    /// Level in its tree (roots are 0).
    pub level: usize,
    /// Index of the user owning its tree.
    pub user: usize,
    /// How it acts.
    pub authority: AuthorityKind,
    /// Receivers (indexes) it touches.
    pub touches: BTreeSet<usize>,
}

/// A forest of agent-session trees.
#[derive(Debug, Clone, PartialEq)]
pub struct Forest {
    /// Every session; a parent always comes before its children.
    pub sessions: Vec<Session>,
    /// Children of each session (by index).
    pub children: Vec<Vec<usize>>,
    /// Indexes of the roots.
    pub roots: Vec<usize>,
    /// Number of receivers.
    pub receivers: usize,
    /// Number of users.
    pub users: usize,
}

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform index below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The session id prefix of a drill run, so several runs can share a hub.
pub fn session_id(run: &str, index: usize) -> String {
    format!("{run}-s{index}")
}

/// The e-mail address of user `index` in run `run`.
pub fn user_email(run: &str, index: usize) -> String {
    format!("user{index}.{run}@drill.example")
}

impl Forest {
    /// Builds the forest: full trees of `depth` and `fanout`, as many as
    /// needed for `sessions`, the last one cut short (filled level by
    /// level). Session ids are `{run}-s{index}`.
    pub fn build(params: &ForestParams, run: &str) -> Forest {
        let mut rng = SplitMix64::new(params.seed);
        let receivers = params.receivers.max(1);
        let users = params.users.max(1);
        let touches = params.touches_per_session.min(receivers);
        let total_share: f64 = params.authority_shares.iter().map(|s| s.max(0.0)).sum();
        let mut sessions: Vec<Session> = Vec::with_capacity(params.sessions);
        let mut children: Vec<Vec<usize>> = Vec::with_capacity(params.sessions);
        let mut roots = Vec::new();
        let mut tree = 0usize;
        while sessions.len() < params.sessions {
            let user = tree % users;
            tree += 1;
            // Level by level (breadth first) within this tree.
            let mut level_nodes = Vec::new();
            for level in 0..=params.depth {
                let parents: Vec<Option<usize>> = if level == 0 {
                    vec![None]
                } else {
                    level_nodes.iter().flat_map(|&p| std::iter::repeat_n(Some(p), params.fanout)).collect()
                };
                let mut next = Vec::new();
                for parent in parents {
                    if sessions.len() >= params.sessions {
                        break;
                    }
                    let index = sessions.len();
                    let authority = pick_authority(&mut rng, &params.authority_shares, total_share);
                    let mut touched = BTreeSet::new();
                    while touched.len() < touches {
                        touched.insert(rng.below(receivers));
                    }
                    sessions.push(Session {
                        id: session_id(run, index),
                        parent,
                        level,
                        user,
                        authority,
                        touches: touched,
                    });
                    children.push(Vec::new());
                    match parent {
                        Some(p) => children[p].push(index),
                        None => roots.push(index),
                    }
                    next.push(index);
                }
                level_nodes = next;
                if level_nodes.is_empty() {
                    break;
                }
            }
        }
        Forest { sessions, children, roots, receivers, users }
    }

    /// Indexes of every session in the subtrees under `roots` (roots
    /// included), each once.
    pub fn subtree(&self, roots: &[usize]) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<usize> = roots.to_vec();
        while let Some(index) = stack.pop() {
            if index < self.sessions.len() && seen.insert(index) {
                stack.extend(self.children[index].iter().copied());
            }
        }
        seen
    }

    /// Roots owned by `user`.
    pub fn roots_of_user(&self, user: usize) -> Vec<usize> {
        self.roots.iter().copied().filter(|&r| self.sessions[r].user == user).collect()
    }

    /// A session in the middle of the first tree deep enough: the first
    /// session at level `max(1, deepest/2)` that has children.
    pub fn mid_session(&self) -> Option<usize> {
        let deepest = self.sessions.iter().map(|s| s.level).max().unwrap_or(0);
        let level = (deepest / 2).max(1);
        (0..self.sessions.len()).find(|&i| self.sessions[i].level == level && !self.children[i].is_empty())
    }

    /// The sessions of each level, in order (parents before children).
    pub fn levels(&self) -> Vec<Vec<usize>> {
        let mut levels: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (index, session) in self.sessions.iter().enumerate() {
            levels.entry(session.level).or_default().push(index);
        }
        levels.into_values().collect()
    }

    /// Total (session, receiver) touches.
    pub fn touch_count(&self) -> usize {
        self.sessions.iter().map(|s| s.touches.len()).sum()
    }
}

fn pick_authority(rng: &mut SplitMix64, shares: &[f64; 3], total: f64) -> AuthorityKind {
    if total <= 0.0 {
        return AuthorityKind::Delegated;
    }
    let mut x = rng.next_f64() * total;
    for (share, kind) in
        shares.iter().zip([AuthorityKind::Delegated, AuthorityKind::Bounded, AuthorityKind::Autonomous])
    {
        let share = share.max(0.0);
        if x < share {
            return kind;
        }
        x -= share;
    }
    AuthorityKind::Autonomous
}

/// One expected delivery: a receiver must be told that a session is revoked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct LeafKey {
    /// Receiver index.
    pub receiver: usize,
    /// Session id.
    pub session: String,
}

/// The leaves a revocation of `targets` must produce: every session of
/// their subtrees not in `already_revoked`, times every receiver it touched
/// (each receiver's stream requests session-revoked). Marks the sessions
/// revoked in `already_revoked`.
pub fn expected_leaves(forest: &Forest, targets: &[usize], already_revoked: &mut BTreeSet<usize>) -> BTreeSet<LeafKey> {
    let mut leaves = BTreeSet::new();
    for index in forest.subtree(targets) {
        if !already_revoked.insert(index) {
            continue;
        }
        let session = &forest.sessions[index];
        for &receiver in &session.touches {
            leaves.insert(LeafKey { receiver, session: session.id.clone() });
        }
    }
    leaves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(sessions: usize) -> ForestParams {
        ForestParams { sessions, depth: 2, fanout: 3, receivers: 5, touches_per_session: 2, ..Default::default() }
    }

    #[test]
    fn deterministic_from_the_seed() {
        let a = Forest::build(&params(50), "r");
        let b = Forest::build(&params(50), "r");
        assert_eq!(a, b);
        let c = Forest::build(&ForestParams { seed: 2, ..params(50) }, "r");
        assert_ne!(a, c);
    }

    #[test]
    fn shape_follows_depth_and_fanout() {
        // A full tree of depth 2, fanout 3 has 13 sessions: 30 = 13 + 13 + 4.
        let forest = Forest::build(&params(30), "r");
        assert_eq!(forest.sessions.len(), 30);
        assert_eq!(forest.roots, vec![0, 13, 26]);
        assert_eq!(forest.children[0], vec![1, 2, 3]);
        assert!(forest.sessions.iter().all(|s| s.level <= 2 && s.touches.len() == 2));
        assert!(forest.sessions.iter().all(|s| s.parent.is_none_or(|p| p < forest.sessions.len())));
        assert_eq!(forest.subtree(&[0]).len(), 13);
        assert_eq!(forest.subtree(&forest.roots).len(), 30);
        assert_eq!(forest.subtree(&[26]).len(), 4);
        assert_eq!(forest.touch_count(), 60);
        let mid = forest.mid_session().expect("a mid-tree session");
        assert_eq!(forest.sessions[mid].level, 1);
    }

    #[test]
    fn expected_leaves_skip_sessions_already_revoked() {
        let forest = Forest::build(&params(13), "r");
        let mut revoked = BTreeSet::new();
        let mid = expected_leaves(&forest, &[1], &mut revoked);
        assert_eq!(mid.len(), 4 * 2, "a session and its 3 children, 2 receivers each");
        let rest = expected_leaves(&forest, &forest.roots, &mut revoked);
        assert_eq!(rest.len(), 9 * 2);
        assert!(mid.is_disjoint(&rest));
    }

    #[test]
    fn authority_shares_are_respected() {
        let forest = Forest::build(&ForestParams { authority_shares: [0.0, 1.0, 0.0], ..params(20) }, "r");
        assert!(forest.sessions.iter().all(|s| s.authority == AuthorityKind::Bounded));
    }
}
