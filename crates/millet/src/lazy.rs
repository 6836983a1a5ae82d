//! A double-ended queue that holds no allocation, and only 8 bytes of its
//! owner, while it is empty: for the queues every connection and session
//! has and most leave empty most of the time (an idle device's control
//! packets, held acknowledgements, in-flight window). A `VecDeque` is 24
//! bytes even empty.

use std::collections::VecDeque;

/// See the module documentation. The box is created by the first push and
/// given back by [`LazyDeque::release`] once empty.
#[derive(Debug)]
// Boxed on purpose: `None` is 8 bytes where an empty `VecDeque` is 24.
#[allow(clippy::box_collection)]
pub struct LazyDeque<T>(Option<Box<VecDeque<T>>>);

impl<T> Default for LazyDeque<T> {
    fn default() -> Self {
        LazyDeque(None)
    }
}

/// Deques given back by [`LazyDeque::release`], kept per thread for the
/// next [`LazyDeque`] that needs one: a fleet's message fills and empties
/// a connection's packet queues and its session's in-flight window, and
/// allocating and freeing them each time (the box and its buffer) was 7%
/// of the event loop's time (session 23's profile).
pub trait Recycled: Sized + 'static {
    /// Run `f` on this thread's pool of empty deques.
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Box<VecDeque<Self>>>) -> R) -> R;
}

/// Empty deques a thread keeps per element type.
const POOL_MAX: usize = 16;

/// Deques that grew beyond this are freed rather than kept.
const POOL_CAPACITY_MAX: usize = 8;

/// Implement [`Recycled`] for a type, with a pool per thread.
macro_rules! recycled {
    ($t:ty) => {
        impl $crate::lazy::Recycled for $t {
            fn with_pool<R>(
                f: impl FnOnce(&mut Vec<Box<std::collections::VecDeque<Self>>>) -> R,
            ) -> R {
                thread_local! {
                    static POOL: std::cell::RefCell<Vec<Box<std::collections::VecDeque<$t>>>> =
                        const { std::cell::RefCell::new(Vec::new()) };
                }
                POOL.with_borrow_mut(f)
            }
        }
    };
}
pub(crate) use recycled;

impl<T> LazyDeque<T> {
    pub const fn new() -> Self {
        LazyDeque(None)
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |d| d.len())
    }

    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|d| d.is_empty())
    }

    pub fn pop_front(&mut self) -> Option<T> {
        self.0.as_mut()?.pop_front()
    }

    pub fn front(&self) -> Option<&T> {
        self.0.as_ref()?.front()
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.0.as_ref()?.get(i)
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.0.as_mut()?.get_mut(i)
    }

    pub fn remove(&mut self, i: usize) -> Option<T> {
        self.0.as_mut()?.remove(i)
    }

    pub fn clear(&mut self) {
        if let Some(d) = self.0.as_mut() {
            d.clear();
        }
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> {
        self.0.iter().flat_map(|d| d.iter())
    }

    pub fn iter_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut T> {
        self.0.iter_mut().flat_map(|d| d.iter_mut())
    }

    pub fn retain(&mut self, f: impl FnMut(&T) -> bool) {
        if let Some(d) = self.0.as_mut() {
            d.retain(f);
        }
    }

    /// Take every element, in order, leaving it empty (and unallocated).
    pub fn take(&mut self) -> VecDeque<T> {
        self.0.take().map(|d| *d).unwrap_or_default()
    }
}

impl<T: Recycled> LazyDeque<T> {
    fn deque(&mut self) -> &mut VecDeque<T> {
        self.0
            .get_or_insert_with(|| T::with_pool(|p| p.pop()).unwrap_or_default())
    }

    pub fn push_back(&mut self, v: T) {
        self.deque().push_back(v);
    }

    pub fn push_front(&mut self, v: T) {
        self.deque().push_front(v);
    }

    /// Give the allocation back if empty (to this thread's pool).
    pub fn release(&mut self) {
        if self.is_empty() {
            if let Some(d) = self.0.take() {
                if d.capacity() <= POOL_CAPACITY_MAX {
                    T::with_pool(|p| {
                        if p.len() < POOL_MAX {
                            p.push(d);
                        }
                    });
                }
            }
        }
    }
}

impl<T: Recycled> Extend<T> for LazyDeque<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, iter: I) {
        let mut iter = iter.into_iter().peekable();
        if iter.peek().is_some() {
            self.deque().extend(iter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LazyDeque;

    super::recycled!(u8);

    #[test]
    fn allocates_only_while_holding_something() {
        let mut q = LazyDeque::new();
        assert!(q.is_empty() && q.0.is_none());
        q.extend(std::iter::empty::<u8>());
        assert!(q.0.is_none(), "an empty extend allocates nothing");
        q.push_back(1);
        q.push_back(2);
        q.push_front(0);
        assert_eq!(q.iter().copied().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(q.remove(1), Some(1));
        assert_eq!(q.get(1), Some(&2));
        q.release();
        assert!(q.0.is_some(), "not released while holding something");
        assert_eq!(q.pop_front(), Some(0));
        assert_eq!(q.pop_front(), Some(2));
        assert_eq!(q.pop_front(), None);
        q.release();
        assert!(q.0.is_none());
        assert_eq!(std::mem::size_of::<LazyDeque<u64>>(), 8);
    }

    #[test]
    fn a_released_deque_serves_the_next_one_on_its_thread() {
        use super::Recycled;
        let pooled = || u8::with_pool(|p| p.len());
        let before = pooled();
        let mut a = LazyDeque::new();
        a.push_back(1u8);
        a.pop_front();
        a.release();
        assert!(a.0.is_none());
        assert_eq!(pooled(), before + 1, "kept for reuse");
        let mut b = LazyDeque::new();
        b.push_back(2u8);
        assert_eq!(pooled(), before, "reused");
        // One that grew large is freed, not kept.
        for i in 0..100 {
            b.push_back(i);
        }
        while b.pop_front().is_some() {}
        b.release();
        assert_eq!(pooled(), before);
    }
}
