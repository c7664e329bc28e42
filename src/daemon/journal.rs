//! The in-flight journal: which fanotify events the daemon has read but not yet answered.
//!
//! Owns the file `STATE_DIR/inflight`. The kernel matches a response to a pre-content event
//! only by the event's fd number, and keeps a read-but-unanswered event (and its blocked
//! reader) for as long as the group lives, which the fd holder guarantees. So when the
//! daemon dies, a successor can still answer those events, if it knows their numbers and
//! what they asked for: that is this journal. One fixed-size slot per fd number, written
//! with `pwrite` (the page cache survives the process), holding which group the event came
//! from (the pre-content group, or the overlay open watch's group, see [`EventKind`]), the
//! file's device and inode (for an overlay open: the lower placeholder's) and the range; the
//! header holds the highest event number a stale event may still carry
//! (the highest unanswered one, the latest one read, and until the predecessor's events are
//! answered the predecessor's own figure), so a successor can reserve every such number
//! before it reads a new one. It falls again as events are answered: a figure that only grew
//! would grow by a reservation's width at every crash with readers waiting, until a
//! successor could no longer reserve it within its descriptor limit.
//!
//! It does not answer anything itself (see the daemon's takeover).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use crate::fill::{EventJournal, FileId};
use crate::sys::fanotify::{EventId, EventRange};

const HEADER: u64 = 64;
const SLOT: u64 = 40;
const MAGIC: &[u8; 8] = b"FFJRNL01";

/// Which group an event was read from: a successor answers it on the same group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A `FAN_PRE_ACCESS` event of the pre-content group: fill the range, then answer.
    Range,
    /// A `FAN_OPEN_PERM`/`FAN_OPEN_EXEC_PERM` event of the overlay open watch's group: fill
    /// the lower placeholder whole, then answer.
    OverlayOpen,
}

impl EventKind {
    fn code(self) -> u32 {
        match self {
            EventKind::Range => 0,
            EventKind::OverlayOpen => 1,
        }
    }

    fn from_code(c: u32) -> Option<EventKind> {
        match c {
            0 => Some(EventKind::Range),
            1 => Some(EventKind::OverlayOpen),
            _ => None,
        }
    }
}

/// An event a predecessor read and did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflight {
    /// The event's number.
    pub id: EventId,
    /// The group it came from.
    pub kind: EventKind,
    /// Device of the file.
    pub dev: u64,
    /// Inode of the file.
    pub ino: u64,
    /// First byte asked for.
    pub offset: u64,
    /// Length (0: the whole file).
    pub count: u64,
}

/// The journal file.
#[derive(Debug)]
pub struct Journal {
    file: File,
    marks: Mutex<Marks>,
}

/// What the recorded highest number is made of.
#[derive(Debug, Default)]
struct Marks {
    /// The predecessor's figure, until its events are answered ([`Journal::release_floor`]).
    floor: i32,
    /// The latest event number read.
    latest: i32,
    /// Numbers of events read and not yet answered (the predecessor's included).
    outstanding: BTreeSet<i32>,
    /// The figure in the file.
    written: i32,
}

impl Journal {
    /// Opens (creating) the journal and reads what a predecessor left: its highest event
    /// number and its unanswered events. The records stay until [`Journal::clear`].
    pub fn open(path: &Path) -> std::io::Result<(Journal, i32, Vec<Inflight>)> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let bytes = std::fs::read(path)?;
        let mut hwm = 0;
        let mut found = Vec::new();
        if bytes.len() >= HEADER as usize && &bytes[..8] == MAGIC {
            hwm = i32::from_ne_bytes(bytes[8..12].try_into().expect("4"));
            let mut at = HEADER as usize;
            let mut n = 0;
            while at + SLOT as usize <= bytes.len() {
                let s = &bytes[at..at + SLOT as usize];
                let tag = i32::from_ne_bytes(s[0..4].try_into().expect("4"));
                let kind = EventKind::from_code(u32::from_ne_bytes(s[4..8].try_into().expect("4")));
                if let (true, Some(kind)) = (tag == n + 1, kind) {
                    let u = |o: usize| u64::from_ne_bytes(s[o..o + 8].try_into().expect("8"));
                    found.push(Inflight {
                        id: EventId::from_raw(n),
                        kind,
                        dev: u(8),
                        ino: u(16),
                        offset: u(24),
                        count: u(32),
                    });
                }
                n += 1;
                at += SLOT as usize;
            }
        } else {
            let mut h = vec![0u8; HEADER as usize];
            h[..8].copy_from_slice(MAGIC);
            file.write_all_at(&h, 0)?;
        }
        let marks = Marks {
            floor: hwm,
            outstanding: found.iter().map(|i| i.id.raw()).collect(),
            written: hwm,
            ..Marks::default()
        };
        Ok((
            Journal {
                file,
                marks: Mutex::new(marks),
            },
            hwm,
            found,
        ))
    }

    /// Forgets a predecessor's event (answered).
    pub fn clear(&self, id: EventId) {
        self.end(id);
    }

    /// The predecessor's events are all answered and its reserved numbers released: its
    /// figure no longer counts.
    pub fn release_floor(&self) {
        self.update(|m| m.floor = 0);
    }

    /// The recorded highest number (for tests and logs).
    pub fn hwm(&self) -> i32 {
        self.marks.lock().unwrap().written
    }

    fn update(&self, f: impl FnOnce(&mut Marks)) {
        let mut m = self.marks.lock().unwrap();
        f(&mut m);
        let hwm = m
            .floor
            .max(m.latest)
            .max(m.outstanding.last().copied().unwrap_or(0));
        if hwm != m.written {
            m.written = hwm;
            let _ = self.file.write_all_at(&hwm.to_ne_bytes(), 8);
        }
    }

    fn slot(id: EventId) -> Option<u64> {
        let n = id.raw();
        (n >= 0).then(|| HEADER + n as u64 * SLOT)
    }
}

impl Journal {
    fn record(&self, id: EventId, kind: EventKind, file: FileId, offset: u64, count: u64) {
        let Some(at) = Journal::slot(id) else { return };
        let mut s = [0u8; SLOT as usize];
        s[0..4].copy_from_slice(&(id.raw() + 1).to_ne_bytes());
        s[4..8].copy_from_slice(&kind.code().to_ne_bytes());
        s[8..16].copy_from_slice(&file.dev().to_ne_bytes());
        s[16..24].copy_from_slice(&file.ino().to_ne_bytes());
        s[24..32].copy_from_slice(&offset.to_ne_bytes());
        s[32..40].copy_from_slice(&count.to_ne_bytes());
        let _ = self.file.write_all_at(&s, at);
        self.update(|m| {
            m.outstanding.insert(id.raw());
        });
    }
}

impl EventJournal for Journal {
    fn begin(&self, id: EventId, file: BorrowedFd<'_>, range: Option<EventRange>) {
        let Ok(st) = nix::sys::stat::fstat(file) else {
            return;
        };
        let (offset, count) = range.map(|r| (r.offset, r.count)).unwrap_or((0, 0));
        self.record(
            id,
            EventKind::Range,
            FileId::new(st.st_dev, st.st_ino),
            offset,
            count,
        );
    }

    fn begin_open(&self, id: EventId, lower: FileId) {
        self.record(id, EventKind::OverlayOpen, lower, 0, 0);
    }

    fn end(&self, id: EventId) {
        if let Some(at) = Journal::slot(id) {
            let _ = self.file.write_all_at(&[0u8; 4], at);
        }
        self.update(|m| {
            m.outstanding.remove(&id.raw());
        });
    }

    fn seen(&self, id: EventId) {
        self.update(|m| m.latest = id.raw());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn unanswered_events_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inflight");
        let f = tempfile::tempfile().unwrap();
        {
            let (j, hwm, found) = Journal::open(&p).unwrap();
            assert_eq!((hwm, found.len()), (0, 0));
            for n in [5, 9, 12] {
                j.seen(EventId::from_raw(n));
                j.begin(
                    EventId::from_raw(n),
                    f.as_fd(),
                    Some(EventRange {
                        offset: 4096 * n as u64,
                        count: 4096,
                    }),
                );
            }
            j.end(EventId::from_raw(9));
            // An open through a watched overlay, recorded with its lower file.
            j.seen(EventId::from_raw(7));
            j.begin_open(EventId::from_raw(7), FileId::new(42, 4242));
        }
        let (j, hwm, found) = Journal::open(&p).unwrap();
        assert_eq!(hwm, 12);
        let ids: Vec<i32> = found.iter().map(|i| i.id.raw()).collect();
        assert_eq!(ids, vec![5, 7, 12]);
        assert_eq!(found[2].offset, 12 * 4096);
        assert_eq!(found[0].kind, EventKind::Range);
        assert_eq!(
            (found[1].kind, found[1].dev, found[1].ino),
            (EventKind::OverlayOpen, 42, 4242)
        );
        j.clear(EventId::from_raw(7));
        // A successor's events, read above the reserved numbers, then the old ones answered.
        j.seen(EventId::from_raw(2100));
        j.begin(EventId::from_raw(2100), f.as_fd(), None);
        j.clear(EventId::from_raw(12));
        j.clear(EventId::from_raw(5));
        j.release_floor();
        assert_eq!(j.hwm(), 2100);
        j.end(EventId::from_raw(2100));
        j.seen(EventId::from_raw(4));
        assert_eq!(
            j.hwm(),
            4,
            "the figure falls once the high events are answered"
        );
        drop(j);
        assert_eq!(Journal::open(&p).unwrap().1, 4);
    }
}
