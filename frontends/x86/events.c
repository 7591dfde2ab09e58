/* Event channels, 2-level ABI, guest side: the upcall's scan, per-port handlers, and the
 * two ways to wait.
 *
 * The scan (do_hypervisor_callback, entered from the upcall stub with events masked):
 * clear upcall_pending, exchange pending_sel with 0, and for each selected word take
 * every pending-and-unmasked bit, lowest first, clearing it before calling the port's
 * handler.  Handlers run with events masked and must only record work (set a flag);
 * the main loop does the work.
 *
 * Waiting: wait_for_events() masks events, returns at once if an upcall ran since the
 * last wait, and otherwise blocks with SCHEDOP_block, which re-enables delivery and
 * checks for pending events atomically in the hypervisor (no lost wake-up). */
#include "pvio.h"

struct shared_info *shared;
volatile u64 events_seen;
static evtchn_handler_t handlers[NR_EVTCHN_PORTS];
static u64 last_seen;
u64 spurious_events;

void events_init(void)
{
    for (unsigned i = 0; i < 64; i++)
        shared->evtchn_mask[i] = 0;
}

void bind_evtchn(u32 port, evtchn_handler_t handler)
{
    if (port < NR_EVTCHN_PORTS)
        handlers[port] = handler;
}

void do_hypervisor_callback(void)
{
    struct vcpu_info *v = &shared->vcpu_info[0];
    WRITE_ONCE(v->evtchn_upcall_pending, 0);
    u64 sel = __atomic_exchange_n(&v->evtchn_pending_sel, 0, __ATOMIC_SEQ_CST);
    while (sel) {
        unsigned word = (unsigned)__builtin_ctzl(sel);
        sel &= sel - 1;
        for (;;) {
            u64 pending = READ_ONCE(shared->evtchn_pending[word]) & ~READ_ONCE(shared->evtchn_mask[word]);
            if (!pending)
                break;
            unsigned bit = (unsigned)__builtin_ctzl(pending);
            __atomic_fetch_and(&shared->evtchn_pending[word], ~(1UL << bit), __ATOMIC_SEQ_CST);
            u32 port = word * 64 + bit;
            if (port < NR_EVTCHN_PORTS && handlers[port])
                handlers[port](port);
            else
                spurious_events++;
        }
    }
    events_seen++;
}

int evtchn_alloc_unbound(u16 remote, u32 *port)
{
    struct { u16 dom, remote_dom; u32 port; } op = {DOMID_SELF, remote, 0};
    long rc = hypercall3(HC_event_channel_op, EVTCHNOP_alloc_unbound, &op, 0);
    if (rc == 0)
        *port = op.port;
    return (int)rc;
}

/* EVTCHNOP_bind_virq: a port the hypervisor raises for virq (device IRQ lines are VIRQs). */
int evtchn_bind_virq(u32 virq, u32 *port)
{
    struct { u32 virq, vcpu, port; } op = {virq, 0, 0};
    long rc = hypercall3(HC_event_channel_op, EVTCHNOP_bind_virq, &op, 0);
    if (rc == 0)
        *port = op.port;
    return (int)rc;
}

int evtchn_send(u32 port)
{
    u32 op = port;
    return (int)hypercall3(HC_event_channel_op, EVTCHNOP_send, &op, 0);
}

int evtchn_close(u32 port)
{
    u32 op = port;
    bind_evtchn(port, 0);
    return (int)hypercall3(HC_event_channel_op, EVTCHNOP_close, &op, 0);
}

/* Unmask upcalls; if one became pending while masked, make the hypervisor deliver it
 * now (any hypercall is a delivery point). */
void local_irq_enable(void)
{
    struct vcpu_info *v = &shared->vcpu_info[0];
    barrier();
    WRITE_ONCE(v->evtchn_upcall_mask, 0);
    mb();
    if (READ_ONCE(v->evtchn_upcall_pending))
        hypercall3(HC_xen_version, 0, 0, 0);
}

void wait_for_events(void)
{
    struct vcpu_info *v = &shared->vcpu_info[0];
    WRITE_ONCE(v->evtchn_upcall_mask, 1);
    mb();
    if (events_seen != last_seen) {
        last_seen = events_seen;
        local_irq_enable();
        return;
    }
    hypercall3(HC_sched_op, SCHEDOP_block, 0, 0); /* unmasks; an upcall may run right after */
    last_seen = events_seen;
}

/* System time from vcpu_info.time (Xen's version protocol: retry while odd or changed). */
u64 now_ns(void)
{
    volatile struct vcpu_time_info *t = &shared->vcpu_info[0].time;
    u32 v;
    u64 ns;
    do {
        v = t->version;
        rmb();
        ns = t->system_time; /* tsc_to_system_mul is 0: no TSC delta to add */
        rmb();
    } while ((v & 1) || v != t->version);
    return ns;
}

void set_timer(u64 deadline)
{
    hypercall3(HC_set_timer_op, deadline, 0, 0);
}
