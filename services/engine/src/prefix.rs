//! Prompts that begin alike are read once: when a sequence leaves the
//! batch its cache (the keys and values of its prompt and of what it
//! wrote) is kept here under its tokens, and a new request whose prompt
//! starts with the same tokens, for the same tenant (team) and adapter,
//! starts from a copy of that part instead of running it through the model
//! again. (Per tenant: a prompt read at once would tell a team that another
//! team sent the same beginning lately.) A team's
//! traffic shares its system prompt, an evaluation its suite's, and a
//! conversation's next turn everything before it; this is what vLLM calls
//! automatic prefix caching, kept simple: whole caches, matched token by
//! token, the least recently used dropped first once the byte budget is
//! spent.

use crate::types::AdapterId;

/// Shared tokens worth a copy: below this, reading them is as quick.
pub(crate) const MIN_SHARED: usize = 16;

/// Whose caches may serve whom: the same tenant, the same adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pub tenant: u64,
    pub adapter: Option<AdapterId>,
}

struct Entry<C> {
    owner: Owner,
    /// The tokens whose keys and values `cache` holds, in order.
    tokens: Vec<u32>,
    cache: C,
    bytes: usize,
    used: u64,
}

pub(crate) struct PrefixCache<C> {
    entries: Vec<Entry<C>>,
    budget: usize,
    held: usize,
    clock: u64,
}

impl<C> PrefixCache<C> {
    /// A store that holds at most `budget` bytes of caches (0: none).
    pub fn new(budget: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget,
            held: 0,
            clock: 0,
        }
    }

    /// Keeps `cache`, which holds `tokens` and takes `bytes`. An entry
    /// whose tokens begin the new ones is replaced (the new one serves
    /// whatever it served); nothing is kept when an entry already begins
    /// with all of them, or when the cache alone is over the budget.
    pub fn insert(&mut self, owner: Owner, tokens: Vec<u32>, cache: C, bytes: usize) {
        if tokens.len() < MIN_SHARED || bytes > self.budget {
            return;
        }
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.owner == owner && e.tokens.starts_with(&tokens))
        {
            // What is already held is as good as new.
            e.used = clock;
            return;
        }
        let held = &mut self.held;
        self.entries.retain(|e| {
            let replaced = e.owner == owner && tokens.starts_with(&e.tokens);
            if replaced {
                *held -= e.bytes;
            }
            !replaced
        });
        while self.held + bytes > self.budget {
            let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used) else {
                break;
            };
            self.held -= self.entries.swap_remove(oldest).bytes;
        }
        self.held += bytes;
        self.entries.push(Entry {
            owner,
            tokens,
            cache,
            bytes,
            used: clock,
        });
    }

    /// The kept cache that shares the most leading tokens with `prompt`
    /// for `owner`, and how many it shares, at most `limit`; `None`
    /// below [`MIN_SHARED`].
    pub fn longest(&mut self, owner: Owner, prompt: &[u32], limit: usize) -> Option<(&C, usize)> {
        let (i, n) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.owner == owner)
            .map(|(i, e)| {
                let n = e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b);
                (i, n.count().min(limit))
            })
            .max_by_key(|&(i, n)| (n, self.entries[i].used))?;
        if n < MIN_SHARED {
            return None;
        }
        self.clock += 1;
        let e = &mut self.entries[i];
        e.used = self.clock;
        Some((&e.cache, n))
    }

    /// Bytes of caches held.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Owner = Owner {
        tenant: 1,
        adapter: None,
    };

    fn tokens(start: u32, n: usize) -> Vec<u32> {
        (start..start + n as u32).collect()
    }

    #[test]
    fn the_longest_shared_beginning_is_found_for_the_same_team_and_adapter_only() {
        let mut p = PrefixCache::new(1000);
        let system = tokens(0, 40);
        let mut a = system.clone();
        a.extend([900, 901, 902]);
        let mut b = system.clone();
        b.extend(tokens(500, 30));
        p.insert(BASE, a, "a", 10);
        p.insert(BASE, b.clone(), "b", 10);
        // A new question after the same system prompt shares the 40.
        let mut asked = system.clone();
        asked.extend([7, 8, 9]);
        assert_eq!(
            p.longest(BASE, &asked, usize::MAX).map(|(_, n)| n),
            Some(40)
        );
        // b's own continuation shares all of b; the limit (a prompt must
        // leave a token to read) cuts it.
        let mut more = b.clone();
        more.push(1);
        assert_eq!(p.longest(BASE, &more, usize::MAX), Some((&"b", 70)));
        assert_eq!(p.longest(BASE, &b, 69), Some((&"b", 69)));
        // Another adapter's keys and values are not these, and another
        // team's prompts are not served from this team's.
        let adapter = Owner {
            adapter: Some(AdapterId(1)),
            ..BASE
        };
        assert_eq!(p.longest(adapter, &more, usize::MAX), None);
        let team = Owner { tenant: 2, ..BASE };
        assert_eq!(p.longest(team, &more, usize::MAX), None);
        // Too short a shared beginning is not worth a copy.
        let mut near = tokens(0, MIN_SHARED - 1);
        near.push(999);
        assert_eq!(p.longest(BASE, &near, usize::MAX), None);
    }

    #[test]
    fn the_budget_drops_the_least_recently_used_and_longer_entries_replace_shorter() {
        let mut p = PrefixCache::new(25);
        p.insert(BASE, tokens(0, 20), "first", 10);
        p.insert(BASE, tokens(100, 20), "second", 10);
        // Using the first makes the second the one to drop.
        assert!(p.longest(BASE, &tokens(0, 20), usize::MAX).is_some());
        p.insert(BASE, tokens(200, 20), "third", 10);
        assert_eq!(p.held(), 20);
        assert!(p.longest(BASE, &tokens(100, 20), usize::MAX).is_none());
        assert!(p.longest(BASE, &tokens(0, 20), usize::MAX).is_some());
        // A conversation's next turn replaces its previous one.
        p.insert(BASE, tokens(200, 30), "third, longer", 12);
        assert_eq!(p.held(), 22);
        assert_eq!(
            p.longest(BASE, &tokens(200, 30), usize::MAX),
            Some((&"third, longer", 30))
        );
        // What an entry already holds adds nothing; what is over the
        // budget on its own is not kept.
        p.insert(BASE, tokens(200, 25), "covered", 5);
        p.insert(BASE, tokens(300, 20), "huge", 26);
        assert_eq!(p.held(), 22);
    }
}
