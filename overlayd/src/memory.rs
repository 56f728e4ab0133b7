//! Giving memory back: a big reconcile, listing or burst of kernel events
//! peaks at a few MiB of transient buffers that glibc would otherwise keep
//! for the daemon's life.

/// This much work (operations, entries read back, events checked) leaves
/// megabytes of freed buffers behind.
pub const TRIM_AFTER: usize = 256;

/// Hands freed heap back to the kernel.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free memory of glibc's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}
