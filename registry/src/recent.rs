//! What recent manifest reads found, kept to save round trips to storage.
//!
//! On S3 every read is a round trip, and under a push load each one waits
//! in the object store's queue (Garage, 16 concurrent pushes: 20-45 ms
//! apiece). A manifest GET by tag needs the tag's link, then the revision
//! link and the content; with what the last read of that tag found, the
//! tag and the guessed revision link are read at once, and the content of
//! a digest, which never changes, not at all.
//!
//! Nothing here is ever served without a fresh read that confirms it: the
//! tag and the revision link are read on every request, so a tag moved or
//! a manifest deleted through another replica is seen at once. A wrong
//! guess costs the round trip it meant to save.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use crate::lock;
use crate::names::{Digest, RepositoryName, Tag};

/// Tags remembered; past this the oldest are forgotten.
const TAGS_KEPT: usize = 4096;

/// Manifest bytes kept (manifests are usually 0.5-2 KiB).
const CONTENT_BYTES_KEPT: usize = 2 << 20;

/// A manifest larger than this is not kept.
const LARGEST_CONTENT_KEPT: usize = 64 << 10;

/// Recent tags and manifest contents; see the module documentation.
#[derive(Default)]
pub struct RecentManifests {
    tags: Mutex<Bounded<(RepositoryName, Tag), Digest>>,
    contents: Mutex<Bounded<Digest, Bytes>>,
}

impl RecentManifests {
    /// The digest `tag` of `name` named when last read.
    pub fn tag(&self, name: &RepositoryName, tag: &Tag) -> Option<Digest> {
        lock(&self.tags).get(&(name.clone(), tag.clone())).cloned()
    }

    /// Notes what `tag` of `name` names now (`None`: no longer anything).
    pub fn note_tag(&self, name: &RepositoryName, tag: &Tag, digest: Option<&Digest>) {
        let key = (name.clone(), tag.clone());
        let mut tags = lock(&self.tags);
        match digest {
            Some(digest) => tags.insert(key, digest.clone(), 1, TAGS_KEPT),
            None => tags.remove(&key),
        }
    }

    /// The bytes of the manifest `digest`, if read lately.
    pub fn content(&self, digest: &Digest) -> Option<Bytes> {
        lock(&self.contents).get(digest).cloned()
    }

    /// Keeps the bytes of the manifest `digest` (read from storage under
    /// that digest, so they never change).
    pub fn note_content(&self, digest: &Digest, content: &Bytes) {
        if content.len() <= LARGEST_CONTENT_KEPT {
            // A copy: `content` may be a slice of a larger buffer.
            lock(&self.contents).insert(digest.clone(), Bytes::copy_from_slice(content), content.len(), CONTENT_BYTES_KEPT);
        }
    }
}

/// A map that forgets its oldest entries beyond a total weight.
struct Bounded<K, V> {
    entries: HashMap<K, (V, usize)>,
    order: VecDeque<K>,
    weight: usize,
}

impl<K, V> Default for Bounded<K, V> {
    fn default() -> Self {
        Bounded {
            entries: HashMap::new(),
            order: VecDeque::new(),
            weight: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Bounded<K, V> {
    fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(value, _)| value)
    }

    fn insert(&mut self, key: K, value: V, weight: usize, most: usize) {
        match self.entries.insert(key.clone(), (value, weight)) {
            Some((_, old)) => self.weight -= old,
            None => self.order.push_back(key),
        }
        self.weight += weight;
        while self.weight > most {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some((_, old)) = self.entries.remove(&oldest) {
                self.weight -= old;
            }
        }
    }

    fn remove(&mut self, key: &K) {
        if let Some((_, old)) = self.entries.remove(key) {
            self.weight -= old;
            self.order.retain(|kept| kept != key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_go_first_and_the_weight_stays_bounded() {
        let mut bounded = Bounded::default();
        for index in 0..10 {
            bounded.insert(index, index, 3, 10);
        }
        assert_eq!(bounded.weight, 9);
        assert_eq!((0..10).filter(|index| bounded.get(index).is_some()).collect::<Vec<_>>(), vec![7, 8, 9]);
        bounded.insert(8, 80, 3, 10);
        assert_eq!((bounded.get(&8), bounded.weight), (Some(&80), 9), "a replaced entry keeps one weight");
        bounded.remove(&8);
        assert_eq!((bounded.get(&8), bounded.weight, bounded.order.len()), (None, 6, 2));
        bounded.insert(1, 1, 11, 10);
        assert_eq!((bounded.weight, bounded.entries.len()), (0, 0), "heavier than the bound: nothing stays");
    }

    #[test]
    fn tags_and_contents_are_remembered_and_forgotten() {
        let recent = RecentManifests::default();
        let name = RepositoryName::parse("vi/ns/disk").unwrap();
        let tag = Tag::parse("v1").unwrap();
        let digest: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        assert_eq!(recent.tag(&name, &tag), None);
        recent.note_tag(&name, &tag, Some(&digest));
        assert_eq!(recent.tag(&name, &tag), Some(digest.clone()));
        recent.note_tag(&name, &tag, None);
        assert_eq!(recent.tag(&name, &tag), None);
        recent.note_content(&digest, &Bytes::from_static(b"{}"));
        assert_eq!(recent.content(&digest).as_deref(), Some(&b"{}"[..]));
        let large: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        recent.note_content(&large, &Bytes::from(vec![0u8; LARGEST_CONTENT_KEPT + 1]));
        assert_eq!(recent.content(&large), None, "large manifests are not kept");
    }
}
