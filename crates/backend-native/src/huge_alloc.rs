//! The engine's memory allocator (`flexbench-native`'s `#[global_allocator]`): blocks of 2 MiB
//! and more get their own anonymous mapping, 2 MiB-aligned and marked `MADV_HUGEPAGE`; smaller
//! ones go to the system allocator.
//!
//! Why: the engine's large blocks are weights, KV cache and disk read buffers, all streamed whole.
//! - O_DIRECT reads into huge-page buffers need one I/O segment per 2 MiB instead of one per
//!   4 KiB page. On this project's virtual disk (virtio) one 16 MiB request at a time read
//!   2.2-2.8 GB/s into huge pages and 1.5-1.7 GB/s into ordinary ones, round after round.
//! - Decode streams every weight once per step: with 4 KiB pages each page is a TLB miss.
//!
//! Where transparent huge pages are off (`never`) the advice is ignored and the mappings are
//! ordinary memory. A fresh mapping is zero, so zeroed allocations cost no extra pass.

use std::alloc::{GlobalAlloc, Layout, System};

/// The huge page size of x86-64 and of most aarch64 kernels, and the threshold of this allocator.
pub const HUGE_PAGE: usize = 2 << 20;
const PAGE: usize = 4096;

/// See the module documentation.
pub struct HugePageAlloc;

fn mapped(size: usize, align: usize) -> bool {
    size >= HUGE_PAGE && align <= HUGE_PAGE
}

/// A new mapping of `size` bytes (rounded up to pages) starting on a 2 MiB boundary, or null.
fn map(size: usize) -> *mut u8 {
    let len = size.next_multiple_of(PAGE);
    // SAFETY: an anonymous private mapping of our own; the slack around the aligned range is
    // unmapped again right away, and nothing else knows these addresses yet.
    unsafe {
        let raw = libc::mmap(
            std::ptr::null_mut(),
            len + HUGE_PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if raw == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        let raw = raw as usize;
        let start = raw.next_multiple_of(HUGE_PAGE);
        let head = start - raw;
        if head > 0 {
            libc::munmap(raw as *mut libc::c_void, head);
        }
        let tail = HUGE_PAGE - head;
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
        // advice only: without transparent huge pages the memory is ordinary pages
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        start as *mut u8
    }
}

/// # Safety
/// `ptr` and `size` must come from one [`map`] call, and the memory must be unused from here on.
unsafe fn unmap(ptr: *mut u8, size: usize) {
    // SAFETY: the caller's promise; the mapping covers size rounded up to pages.
    unsafe { libc::munmap(ptr as *mut libc::c_void, size.next_multiple_of(PAGE)) };
}

// SAFETY: every block is either the system allocator's (same layout rule on both sides, as
// `mapped` depends only on the layout) or a mapping of at least the requested size, aligned to
// 2 MiB (which covers any alignment `mapped` admits).
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mapped(layout.size(), layout.align()) {
            map(layout.size())
        } else {
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(layout.size(), layout.align()) {
            // a fresh anonymous mapping reads as zeros
            map(layout.size())
        } else {
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mapped(layout.size(), layout.align()) {
            // SAFETY: allocated by `map` with this size (same layout rule as in alloc).
            unsafe { unmap(ptr, layout.size()) }
        } else {
            // SAFETY: the system allocator's block with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !mapped(layout.size(), layout.align()) && !mapped(new_size, layout.align()) {
            // SAFETY: the system allocator's block, staying with it.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: the layout's alignment is valid and new_size does not overflow (the
        // caller's promises for realloc).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: new_size is non-zero (caller's promise).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and distinct.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `THPeligible` flag of the mapping containing `addr`, from /proc/self/smaps.
    fn thp_eligible(addr: usize) -> Option<bool> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= addr && addr < b;
                    continue;
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("THPeligible:") {
                    return Some(v.trim() == "1");
                }
            }
        }
        None
    }

    #[test]
    fn large_blocks_are_aligned_zeroed_huge_page_mappings_and_survive_realloc() {
        let a = HugePageAlloc;
        let size = 5 * HUGE_PAGE + 12345;
        let layout = Layout::from_size_align(size, 64).unwrap();
        unsafe {
            let p = a.alloc_zeroed(layout);
            assert!(!p.is_null());
            assert_eq!(p as usize % HUGE_PAGE, 0);
            let s = std::slice::from_raw_parts_mut(p, size);
            assert!(s.iter().all(|&b| b == 0));
            let thp_on = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
                .is_ok_and(|m| !m.contains("[never]"));
            if thp_on {
                assert_eq!(thp_eligible(p as usize), Some(true));
            }
            for (i, b) in s.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            // grow and shrink across the threshold: contents kept
            let q = a.realloc(p, layout, 2 * size);
            let grown = Layout::from_size_align(2 * size, 64).unwrap();
            let s = std::slice::from_raw_parts(q, size);
            assert!(s.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            let r = a.realloc(q, grown, 1000);
            let s = std::slice::from_raw_parts(r, 1000);
            assert!(s.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            a.dealloc(r, Layout::from_size_align(1000, 64).unwrap());
        }
        // small blocks stay with the system allocator
        let small = Layout::from_size_align(1000, 8).unwrap();
        unsafe {
            let p = a.alloc(small);
            assert!(!p.is_null());
            a.dealloc(p, small);
        }
    }
}
