//! KVM guest first-write throughput and tracking-fault rates: `kvm/first_write/{untracked,
//! dirty_log, uffd_wp_fine, uffd_wp_coarse, uffd_wp_adaptive}` (MiB/s of guest memory written
//! for the first time in an epoch) and `kvm/faults/{dirty_log, uffd_wp_fine}` (tracking faults
//! per second), and `kvm/faults/uffd_host_thread`: the same userfaultfd round trip taken by a VMM
//! thread writing guest memory, without KVM in the loop, to separate what userfaultfd costs from
//! what the hypervisor adds to a guest's fault.
//!
//! One iteration is one epoch: a checkpoint re-protects guest RAM (not timed), then a vCPU runs
//! `rep stosb` over 8 MiB of fresh, protected RAM (timed, from `KVM_RUN` to the guest's exit).
//! Without `/dev/kvm` the benches print why and measure nothing.
#![allow(missing_docs)]

#[cfg(target_os = "linux")]
mod linux {
    use std::time::{Duration, Instant};

    use criterion::{Criterion, Throughput};
    use squib_arch::GpaRange;
    use squib_kvm::{Machine, MemoryLayout, Tracking, VmConfig};
    use squib_snapshot::{Policy, TrackingConfig};
    use vm_memory::{Bytes, GuestAddress};

    /// Bytes each iteration writes.
    const SPAN: u64 = 8 << 20;

    fn machine(tracking: Tracking, policy: Policy, tracked: bool) -> Machine {
        let layout = MemoryLayout::new(vec![GpaRange::new(0, 2 * SPAN).unwrap()]).unwrap();
        let cfg = VmConfig {
            layout,
            vcpus: 1,
            tracking,
        };
        let mut m = Machine::new(&cfg, TrackingConfig::new(policy)).unwrap();
        // Map the span into the guest once, so the first timed epoch measures tracking, not the
        // hypervisor building its tables.
        m.vm.poke(0, 0, SPAN, 1).unwrap();
        if tracked {
            m.tracker.start().unwrap();
        }
        m
    }

    /// Time `iters` epochs: re-protect (untimed), then first-write the span.
    fn epochs(m: &mut Machine, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for i in 0..iters {
            m.tracker
                .checkpoint(None, |_| Ok::<_, std::io::Error>(()))
                .unwrap();
            let t = Instant::now();
            let byte = u8::try_from(i % 251).unwrap_or(0) + 2;
            m.vm.poke(0, 0, SPAN, byte).unwrap();
            total += t.elapsed();
        }
        total
    }

    pub fn kvm(c: &mut Criterion) {
        if !squib_kvm::kvm_or_skip("kvm benches") {
            return;
        }
        let cases: [(&str, Tracking, Policy, bool); 5] = [
            ("untracked", Tracking::UffdWp, Policy::Fine, false),
            ("dirty_log", Tracking::DirtyLog, Policy::Fine, true),
            ("uffd_wp_fine", Tracking::UffdWp, Policy::Fine, true),
            ("uffd_wp_coarse", Tracking::UffdWp, Policy::Coarse, true),
            ("uffd_wp_adaptive", Tracking::UffdWp, Policy::Adaptive, true),
        ];
        let mut g = c.benchmark_group("kvm/first_write");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Bytes(SPAN));
        for (name, tracking, policy, tracked) in cases {
            let mut m = machine(tracking, policy, tracked);
            g.bench_function(name, |b| b.iter_custom(|iters| epochs(&mut m, iters)));
            m.shutdown().unwrap();
        }
        g.finish();
        // The same epochs counted in tracking faults: one per 4 KiB page of the span.
        let mut g = c.benchmark_group("kvm/faults");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements(SPAN / 4096));
        for (name, tracking) in [
            ("dirty_log", Tracking::DirtyLog),
            ("uffd_wp_fine", Tracking::UffdWp),
        ] {
            let mut m = machine(tracking, Policy::Fine, true);
            g.bench_function(name, |b| b.iter_custom(|iters| epochs(&mut m, iters)));
            let faults = m.tracker.counters().faults;
            if tracking == Tracking::UffdWp {
                // Every page of every epoch faulted once: the element count is honest.
                assert_eq!(faults % (SPAN / 4096), 0, "uffd-wp fine faults {faults}");
            }
            m.shutdown().unwrap();
        }
        let m = machine(Tracking::UffdWp, Policy::Fine, true);
        g.bench_function("uffd_host_thread", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    m.tracker
                        .checkpoint(None, |_| Ok::<_, std::io::Error>(()))
                        .unwrap();
                    let t = Instant::now();
                    for page in 0..SPAN / 4096 {
                        m.vm.ram().write_obj(1u8, GuestAddress(page * 4096)).unwrap();
                    }
                    total += t.elapsed();
                }
                total
            });
        });
        m.shutdown().unwrap();
        g.finish();
    }
}

#[cfg(target_os = "linux")]
criterion::criterion_group!(benches, linux::kvm);
#[cfg(target_os = "linux")]
criterion::criterion_main!(benches);

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("kvm benches: skipped: KVM needs Linux");
}
