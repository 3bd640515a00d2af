/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/*
 * irqbridge Cloud Hypervisor guest: a bare-metal 64-bit program (PVH entry in entry.S) that
 * drives the irqbridge test device (docs/device-abi.md) under Cloud Hypervisor's
 * `--user-device` and checks exact interrupt counts itself. Results go to COM1 as lines:
 *
 *   BOOT <n>                         start of boot n (1, then 2 after the guest's reboot)
 *   RESULT <scenario> PASS|FAIL boot=<n> <details>
 *   INFO <key> <details>             a recorded Cloud Hypervisor behaviour
 *   REBOOT                           end of boot 1: the guest asks for an ACPI reset
 *   DONE boot=<n> pass=<p> fail=<f>  end of the run: the guest asks for an ACPI shutdown
 *
 * The protocol, the scenarios and what they prove: docs/cloud-hypervisor.md.
 */
#include <stdarg.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* ---- device ABI (docs/device-abi.md) ---- */
#define DEV_VENDOR 0x6972
#define DEV_DEVICE 0x7162
#define R_MAGIC 0x000
#define R_ABI_VERSION 0x004
#define R_FEATURES 0x008
#define R_MSIX_VECTORS 0x00c
#define R_INTX_ASSERT 0x010
#define R_INTX_DEASSERT 0x014
#define R_INTX_STATUS 0x018
#define R_MSIX_FIRE 0x020
#define R_MSIX_MASK 0x024
#define R_MSIX_UNMASK 0x028
#define R_EVTCHN_SEND 0x030
#define R_EVTCHN_BIND 0x034
#define R_EVTCHN_CLOSE 0x03c
#define R_DOORBELL 0x040
#define R_DOORBELL_COUNT 0x044
#define R_EVTCHN_UNMASK 0x048
#define R_EVTCHN_PORTS 0x04c
#define R_EVTCHN_QUERY 0x050
#define R_EVTCHN_STATUS 0x054
#define R_CNT_INTX_TRIGGERS 0x100
#define R_CNT_INTX_UNMASKS 0x104
#define R_CNT_MSIX_TRIGGERS 0x108
#define R_CNT_MSIX_PENDING 0x10c
#define R_CNT_EVTCHN_SENDS 0x110
#define R_CNT_EVTCHN_UPCALLS 0x114
#define R_CNT_BAD_ACCESSES 0x118
#define MAGIC 0x69726262u
#define NVEC 16
#define NPORTS 1024
#define PBA_OFFSET 0x1000

/* ---- platform (Cloud Hypervisor, x86_64) ---- */
#define COM1 0x3f8
#define ACPI_PORT 0x600          /* CH's FADT: sleep control and reset register */
#define ACPI_RESET 0x01
#define ACPI_S5 ((5 << 2) | (1 << 5))
#define IOAPIC_BASE 0xfec00000ul
#define LAPIC_BASE 0xfee00000ul
#define CH_FIRST_PCI_IRQ 5       /* CH shares 8 IRQs from GSI 5 between the 32 slots */

/* ---- guest vectors ---- */
#define VEC_INTX 0x30
#define VEC_MSIX0 0x40           /* MSI-X entry i -> vector 0x40 + i */
#define VEC_SPURIOUS 0xff

/* Scenario constants. */
#define INTX_ROUNDS 10
#define INTX_REFIRES 5
#define MSIX_FIRES 3
#define DOORBELLS 1000
#define MARK_PORT 1023           /* left bound at the reboot: tells reset from reconnect */
#define MARK_VECTOR 15
#define MARK_WORD 0x1bb0ca11ab1e0001ull /* left in mask[63] of the page at the reboot */
#define UPCALL_A 9
#define UPCALL_B 10

/* ---- low-level helpers ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u64 rd64(u64 a) { return *(volatile u64 *)a; }
static inline void wr64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void pause(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 read_cr2(void)
{
    u64 v;
    __asm__ volatile("mov %%cr2, %0" : "=r"(v));
    return v;
}

/* ---- serial output ---- */
static void putc_serial(char c)
{
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        pause();
    outb(COM1, (u8)c);
}
static void puts_serial(const char *s)
{
    while (*s)
        putc_serial(*s++);
}
static void put_num(u64 v, unsigned base)
{
    char buf[24];
    int n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v && n < 24);
    if (base == 16)
        puts_serial("0x");
    while (n)
        putc_serial(buf[--n]);
}
/* printf subset: %s, %u (u64), %d (int), %x (u64, with 0x), %%. */
static void out(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            putc_serial(*fmt);
            continue;
        }
        fmt++;
        switch (*fmt) {
        case 's':
            puts_serial(va_arg(ap, const char *));
            break;
        case 'u':
            put_num(va_arg(ap, u64), 10);
            break;
        case 'd': {
            int v = va_arg(ap, int);
            if (v < 0) {
                putc_serial('-');
                v = -v;
            }
            put_num((u64)v, 10);
            break;
        }
        case 'x':
            put_num(va_arg(ap, u64), 16);
            break;
        case '%':
            putc_serial('%');
            break;
        default:
            return;
        }
    }
    va_end(ap);
}

static void acpi_write(u8 v)
{
    outb(ACPI_PORT, v);
    for (;;) {
        cli();
        __asm__ volatile("hlt");
    }
}

/* ---- time ---- */
static u64 tsc_khz;

static void tsc_init(void)
{
    u32 a, b, c, d;
    cpuid(0x40000000, &a, &b, &c, &d);
    if (a >= 0x40000010) {
        cpuid(0x40000010, &a, &b, &c, &d);
        if (a)
            tsc_khz = a;
    }
    if (!tsc_khz) {
        cpuid(0, &a, &b, &c, &d);
        if (a >= 0x16) {
            cpuid(0x16, &a, &b, &c, &d);
            if (a & 0xffff)
                tsc_khz = (u64)(a & 0xffff) * 1000;
        }
    }
    if (!tsc_khz)
        tsc_khz = 3000000; /* a guess on the high side: waits get longer, never shorter */
}
static u64 ms_to_tsc(u64 ms) { return ms * tsc_khz; }
static void delay_ms(u64 ms)
{
    u64 end = rdtsc() + ms_to_tsc(ms);
    while (rdtsc() < end)
        pause();
}

/* ---- PCI config through 0xcf8/0xcfc, bus 0, function 0 ---- */
static u32 cfg_rd(unsigned dev, unsigned off)
{
    outl(0xcf8, 0x80000000u | (dev << 11) | (off & 0xfc));
    return inl(0xcfc);
}
static void cfg_wr(unsigned dev, unsigned off, u32 v)
{
    outl(0xcf8, 0x80000000u | (dev << 11) | (off & 0xfc));
    outl(0xcfc, v);
}

/* ---- LAPIC / IOAPIC ---- */
static void lapic_eoi(void) { wr32(LAPIC_BASE + 0xb0, 0); }
static void ioapic_wr(u32 reg, u32 v)
{
    wr32(IOAPIC_BASE, reg);
    wr32(IOAPIC_BASE + 0x10, v);
}
static u32 ioapic_rd(u32 reg)
{
    wr32(IOAPIC_BASE, reg);
    return rd32(IOAPIC_BASE + 0x10);
}

static void lapic_init(void)
{
    outb(0x21, 0xff); /* mask both 8259s, if there are any */
    outb(0xa1, 0xff);
    wr32(LAPIC_BASE + 0x80, 0);     /* TPR */
    wr32(LAPIC_BASE + 0xf0, 0x1ff); /* SVR: enabled, spurious vector 0xff */
}

static void ioapic_route(unsigned pin, unsigned vector, int masked)
{
    u32 apic_id = rd32(LAPIC_BASE + 0x20) >> 24;
    ioapic_wr(0x11 + 2 * pin, apic_id << 24);
    ioapic_wr(0x10 + 2 * pin, vector | (1u << 15) /* level, active high */ | (masked ? 1u << 16 : 0));
}

/* ---- interrupt handling ---- */
struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

#define ACT_EOI 1u
#define ACT_DEASSERT_AFTER 2u /* write INTX_DEASSERT on the n-th run */
#define ACT_TOUCH_BAR0 4u     /* read INTX_STATUS (a trapped BAR access) on runs before n */
#define ACT_EVTCHN 8u         /* Xen 2-level upcall handler on the BAR4 page */

struct action {
    u32 flags;
    u32 n;
    u32 upcall;
    volatile u32 hits;
};

static struct action actions[256];
static volatile u64 counts[256];
static volatile u64 stray;          /* interrupts on vectors without an action */
static volatile u32 port_count[NPORTS];
static u64 bar0, bar2, bar4;
static unsigned boot;

static void evtchn_collect(unsigned upcall)
{
    u64 block = bar4 + 0x400 + 16ul * upcall;
    wr64(block, 0); /* upcall_pending */
    u64 sel = __atomic_exchange_n((volatile u64 *)(block + 8), 0, __ATOMIC_SEQ_CST);
    while (sel) {
        unsigned w = (unsigned)__builtin_ctzll(sel);
        sel &= sel - 1;
        volatile u64 *pending = (volatile u64 *)(bar4 + 8ul * w);
        u64 bits = *pending & ~rd64(bar4 + 0x200 + 8ul * w);
        while (bits) {
            unsigned b = (unsigned)__builtin_ctzll(bits);
            bits &= bits - 1;
            u64 old = __atomic_fetch_and(pending, ~(1ull << b), __ATOMIC_SEQ_CST);
            if ((old >> b) & 1 && 64 * w + b < NPORTS)
                port_count[64 * w + b]++;
        }
    }
}

static void fatal_fault(struct frame *f)
{
    out("FAULT vector=%u error=%x rip=%x cr2=%x\n", f->vector, f->error, f->rip, read_cr2());
    out("RESULT fault FAIL boot=%u exception %u at rip %x\n", (u64)boot, f->vector, f->rip);
    out("DONE boot=%u pass=0 fail=1\n", (u64)boot);
    acpi_write(ACPI_S5);
}

void isr_dispatch(struct frame *f)
{
    unsigned v = (unsigned)(f->vector & 0xff);
    if (v < 32) {
        fatal_fault(f);
        return;
    }
    struct action *a = &actions[v];
    if (v == VEC_SPURIOUS) {
        counts[v]++;
        return;
    }
    if (!a->flags) {
        stray++;
        lapic_eoi();
        counts[v]++;
        return;
    }
    u32 hits = ++a->hits;
    if (a->flags & ACT_DEASSERT_AFTER) {
        if (hits >= a->n)
            wr32(bar0 + R_INTX_DEASSERT, 1);
        else if (a->flags & ACT_TOUCH_BAR0)
            (void)rd32(bar0 + R_INTX_STATUS);
    }
    if (a->flags & ACT_EVTCHN)
        evtchn_collect(a->upcall);
    if (a->flags & ACT_EOI)
        lapic_eoi();
    counts[v]++;
}

static void set_action(unsigned v, u32 flags, u32 n, u32 upcall)
{
    cli();
    actions[v].flags = flags;
    actions[v].n = n;
    actions[v].upcall = upcall;
    actions[v].hits = 0;
    sti();
}

/* Waits until counts[v] >= target (or timeout); returns counts[v]. */
static u64 wait_count(unsigned v, u64 target, u64 timeout_ms)
{
    u64 end = rdtsc() + ms_to_tsc(timeout_ms);
    while (counts[v] < target && rdtsc() < end)
        pause();
    return counts[v];
}
static u32 wait_port(unsigned p, u32 target, u64 timeout_ms)
{
    u64 end = rdtsc() + ms_to_tsc(timeout_ms);
    while (port_count[p] < target && rdtsc() < end)
        pause();
    return port_count[p];
}

/* How long the guest waits to be sure that nothing more arrives. */
#define SETTLE_MS 50
#define WAIT_MS 1000

/* ---- results ---- */
static unsigned n_pass, n_fail;

static void result(const char *scenario, int ok)
{
    if (ok)
        n_pass++;
    else
        n_fail++;
    out("RESULT %s %s boot=%u ", scenario, ok ? "PASS" : "FAIL", (u64)boot);
}

/* Device counters. */
struct dcnt {
    u32 intx_triggers, intx_unmasks, msix_triggers, msix_pending, evtchn_sends, evtchn_upcalls,
        bad;
};
static struct dcnt dcnt_read(void)
{
    struct dcnt c;
    c.intx_triggers = rd32(bar0 + R_CNT_INTX_TRIGGERS);
    c.intx_unmasks = rd32(bar0 + R_CNT_INTX_UNMASKS);
    c.msix_triggers = rd32(bar0 + R_CNT_MSIX_TRIGGERS);
    c.msix_pending = rd32(bar0 + R_CNT_MSIX_PENDING);
    c.evtchn_sends = rd32(bar0 + R_CNT_EVTCHN_SENDS);
    c.evtchn_upcalls = rd32(bar0 + R_CNT_EVTCHN_UPCALLS);
    c.bad = rd32(bar0 + R_CNT_BAD_ACCESSES);
    return c;
}

/* ---- the device ---- */
static unsigned slot;
static u32 command_at_boot, msix_ctl_at_boot; /* as found, before this boot changed them */
static unsigned intx_pin;
static u32 bar_size[6];

static u32 size_bar(unsigned off)
{
    u32 save = cfg_rd(slot, off);
    cfg_wr(slot, off, 0xffffffffu);
    u32 probe = cfg_rd(slot, off);
    cfg_wr(slot, off, save);
    if (!probe)
        return 0;
    return ~(probe & ~0xfu) + 1;
}

static u32 msix_ctl_read(void) { return cfg_rd(slot, 0x40) >> 16; }
static void msix_ctl_write(u32 ctl)
{
    u32 dw = cfg_rd(slot, 0x40);
    cfg_wr(slot, 0x40, (dw & 0xffff) | (ctl << 16));
}
#define MSIX_ENABLE 0x8000u
#define MSIX_FMASK 0x4000u

static void msix_entry(unsigned i, u32 data, u32 ctrl)
{
    u64 e = bar2 + 16ul * i;
    wr32(e + 0, 0xfee00000u | ((rd32(LAPIC_BASE + 0x20) >> 24) << 12));
    wr32(e + 4, 0);
    wr32(e + 8, data);
    wr32(e + 12, ctrl);
}
static u32 pba_bit(unsigned i) { return (rd32(bar2 + PBA_OFFSET + 4 * (i / 32)) >> (i % 32)) & 1; }

/* Scenario: enumeration. Finds the device, sizes its BARs, walks its capabilities. */
static int scenario_enumerate(void)
{
    int found = 0;
    for (unsigned d = 0; d < 32; d++) {
        if (cfg_rd(d, 0) == ((u32)DEV_DEVICE << 16 | DEV_VENDOR)) {
            slot = d;
            found = 1;
            break;
        }
    }
    if (!found) {
        result("enumerate", 0);
        out("no device %x:%x on bus 0\n", (u64)DEV_VENDOR, (u64)DEV_DEVICE);
        return 0;
    }
    u32 class_rev = cfg_rd(slot, 0x08);
    u32 hdr = (cfg_rd(slot, 0x0c) >> 16) & 0x7f;
    u32 subsys = cfg_rd(slot, 0x2c);
    u32 line_pin = cfg_rd(slot, 0x3c);
    u32 status = cfg_rd(slot, 0x04) >> 16;
    u32 cap_ptr = cfg_rd(slot, 0x34) & 0xff;

    /* Decode off while the BARs are sized. */
    u32 cmd = cfg_rd(slot, 0x04) & 0xffff;
    command_at_boot = cmd;
    cfg_wr(slot, 0x04, cmd & ~0x3u);
    u32 addr[6];
    for (unsigned i = 0; i < 6; i++) {
        addr[i] = cfg_rd(slot, 0x10 + 4 * i);
        bar_size[i] = size_bar(0x10 + 4 * i);
    }
    u32 rom = size_bar(0x30);
    /* Memory decode and bus master on, INTx not disabled. */
    cfg_wr(slot, 0x04, 0x0006);

    int caps_ok = 0, cap_count = 0;
    u32 mctl = 0, table = 0, pba = 0;
    for (u32 p = cap_ptr; p && p < 0x100 && cap_count < 48; cap_count++) {
        u32 dw = cfg_rd(slot, p);
        if ((dw & 0xff) == 0x11) {
            caps_ok = (p == 0x40);
            mctl = dw >> 16;
            msix_ctl_at_boot = mctl;
            table = cfg_rd(slot, p + 4);
            pba = cfg_rd(slot, p + 8);
        }
        p = (dw >> 8) & 0xfc;
    }
    bar0 = addr[0] & ~0xfu;
    bar2 = addr[2] & ~0xfu;
    bar4 = addr[4] & ~0xfu;
    intx_pin = CH_FIRST_PCI_IRQ + slot % 8;

    int ok = class_rev == 0xff000001u && hdr == 0 && subsys == 0x00016972u &&
             ((line_pin >> 8) & 0xff) == 1 && (status & 0x10) && cap_ptr == 0x40 && caps_ok &&
             (mctl & 0x7ff) + 1 == NVEC && table == 0x2 && pba == (PBA_OFFSET | 2) &&
             bar_size[0] == 0x1000 && bar_size[1] == 0 && bar_size[2] == 0x2000 &&
             bar_size[3] == 0 && bar_size[4] == 0x1000 && bar_size[5] == 0 && rom == 0 && bar0 &&
             bar2 && bar4 && !(addr[0] & 0xf) && !(addr[2] & 0xf) && !(addr[4] & 0xf);
    u32 magic = 0, abi = 0, feat = 0, nvec = 0, nports = 0;
    if (ok) {
        magic = rd32(bar0 + R_MAGIC);
        abi = rd32(bar0 + R_ABI_VERSION);
        feat = rd32(bar0 + R_FEATURES);
        nvec = rd32(bar0 + R_MSIX_VECTORS);
        nports = rd32(bar0 + R_EVTCHN_PORTS);
        ok = magic == MAGIC && abi == 1 && (feat & 7) == 7 && nvec == NVEC && nports == NPORTS;
    }
    if (ok) {
        /* A fresh server's DOORBELL_COUNT is 0; boot 1 rings DOORBELLS doorbells, and the
           counters survive DEVICE_RESET and reconnects alike. */
        boot = rd32(bar0 + R_DOORBELL_COUNT) == 0 ? 1 : 2;
        out("BOOT %u\n", (u64)boot);
    }
    result("enumerate", ok);
    out("slot=%u id=%x class_rev=%x subsys=%x pin=%u line=%u bars=%x/%x/%x sizes=%x/%x/%x/%x/%x/%x "
        "rom=%x msix_cap=%u table_size=%u table=%x pba=%x magic=%x abi=%u features=%x ports=%u\n",
        (u64)slot, (u64)cfg_rd(slot, 0), (u64)class_rev, (u64)subsys, (u64)((line_pin >> 8) & 0xff),
        (u64)(line_pin & 0xff), (u64)bar0, (u64)bar2, (u64)bar4, (u64)bar_size[0],
        (u64)bar_size[1], (u64)bar_size[2], (u64)bar_size[3], (u64)bar_size[4], (u64)bar_size[5],
        (u64)rom, (u64)caps_ok, (u64)((mctl & 0x7ff) + 1), (u64)table, (u64)pba, (u64)magic,
        (u64)abi, (u64)feat, (u64)nports);
    return ok;
}

/*
 * Scenario: what the device kept over the reboot. Boot 1 leaves MARK_PORT bound and MARK_WORD
 * in the page: a reset closes every port and zeroes the page, a reconnect keeps both.
 */
static void scenario_boot_state(void)
{
    u32 doorbells = rd32(bar0 + R_DOORBELL_COUNT);
    wr32(bar0 + R_EVTCHN_QUERY, MARK_PORT);
    u32 st = rd32(bar0 + R_EVTCHN_STATUS);
    u64 word = rd64(bar4 + 0x200 + 8 * 63);
    int bound = (st & 3) == 2 && (st >> 16) == MARK_VECTOR;
    int ok;
    /* Config reads other than the BARs and the MSI-X table/PBA offsets come from the device
       (CH forwards them), so COMMAND and Message Control show the device's own state. */
    u32 enabled = msix_ctl_at_boot & MSIX_ENABLE;
    if (boot == 1) {
        ok = st == 0 && word == 0 && !enabled && command_at_boot == 0;
        result("boot-state", ok);
        out("fresh device: doorbells=%u mark_port_status=%x mark_word=%x msix_ctl=%x command=%x\n",
            (u64)doorbells, (u64)st, word, (u64)msix_ctl_at_boot, (u64)command_at_boot);
    } else {
        /* Boot 1 ended with MSI-X enabled and COMMAND = memory | bus master. */
        int kept = bound && word == MARK_WORD && enabled && command_at_boot == 0x6;
        int reset = st == 0 && word == 0 && !enabled && command_at_boot == 0;
        /* With the state kept, the device still has MSI-X enabled, so it suppresses INTx
           (CH bound the INTx trigger at connect) until the guest clears the Enable bit;
           clearing it with the line high fires INTx once. */
        u64 runs_stale = 0, runs_cleared = 0;
        if (kept) {
            ioapic_route(intx_pin, VEC_INTX, 0);
            set_action(VEC_INTX, ACT_EOI | ACT_DEASSERT_AFTER, 1, 0);
            u64 c0 = counts[VEC_INTX];
            wr32(bar0 + R_INTX_ASSERT, 1);
            delay_ms(SETTLE_MS);
            runs_stale = counts[VEC_INTX] - c0;
            msix_ctl_write(0);
            wait_count(VEC_INTX, c0 + 1, WAIT_MS);
            delay_ms(SETTLE_MS);
            runs_cleared = counts[VEC_INTX] - c0;
            ioapic_route(intx_pin, VEC_INTX, 1);
            set_action(VEC_INTX, 0, 0, 0);
        }
        ok = doorbells == DOORBELLS && (reset || (kept && runs_stale == 0 && runs_cleared == 1));
        result("reboot", ok);
        out("device_state=%s doorbells=%u mark_port_status=%x mark_word=%x msix_ctl=%x "
            "command=%x intx_runs_stale_msix=%u intx_runs_after_clearing=%u\n",
            kept ? "kept" : reset ? "reset" : "inconsistent", (u64)doorbells, (u64)st, word,
            (u64)msix_ctl_at_boot, (u64)command_at_boot, runs_stale, runs_cleared);
        out("INFO ch-reboot %s\n",
            kept ? "reconnected without DEVICE_RESET: the device kept its guest-visible state "
                   "(ports, page, COMMAND, MSI-X Enable) while CH's own MSI-X state starts "
                   "disabled: INTx stays suppressed until the guest clears MSI-X Enable"
                 : reset ? "the device was reset (ports closed, page zeroed, MSI-X off)"
                         : "neither reset nor kept");
    }
    /* A known state whatever the previous boot left: MSI-X off, INTx low, ports closed. */
    msix_ctl_write(0);
    wr32(bar0 + R_INTX_DEASSERT, 1);
    wr32(bar0 + R_EVTCHN_CLOSE, MARK_PORT);
    for (unsigned i = 0; i < 4096 / 8; i++)
        wr64(bar4 + 8ul * i, 0);
}

/* Scenario: INTx through CH's IOAPIC. */
static void scenario_intx(void)
{
    u32 ver = ioapic_rd(1);
    unsigned max_pin = (ver >> 16) & 0xff;
    if (intx_pin > max_pin) {
        result("intx", 0);
        out("pin %u beyond the IOAPIC's %u\n", (u64)intx_pin, (u64)max_pin);
        return;
    }
    ioapic_route(intx_pin, VEC_INTX, 0);

    /* 1: assert; the handler de-asserts and EOIs: exactly one run per assert. */
    set_action(VEC_INTX, ACT_EOI | ACT_DEASSERT_AFTER, 1, 0);
    struct dcnt d0 = dcnt_read();
    u64 c0 = counts[VEC_INTX];
    int ok = 1;
    unsigned bad_round = 0;
    for (unsigned r = 0; r < INTX_ROUNDS; r++) {
        u64 before = counts[VEC_INTX];
        wr32(bar0 + R_INTX_ASSERT, 1);
        wait_count(VEC_INTX, before + 1, WAIT_MS);
        delay_ms(SETTLE_MS / 5);
        if (counts[VEC_INTX] != before + 1 && ok) {
            ok = 0;
            bad_round = r;
        }
    }
    delay_ms(SETTLE_MS);
    u64 runs = counts[VEC_INTX] - c0;
    struct dcnt d1 = dcnt_read();
    u32 level = rd32(bar0 + R_INTX_STATUS);
    /* Per round: the assert fires (the device auto-masks), CH's UNMASK after that trapped write
       re-fires (the line is still high; both land in the LAPIC's IRR before the vCPU runs
       again: one handler run), the handler's de-assert is followed by one more UNMASK. */
    ok = ok && runs == INTX_ROUNDS && (level & 1) == 0 &&
         d1.intx_triggers - d0.intx_triggers == 2 * INTX_ROUNDS &&
         d1.intx_unmasks - d0.intx_unmasks == 2 * INTX_ROUNDS;
    result("intx", ok);
    out("pin=%u rounds=%u handler_runs=%u first_bad_round=%d status=%x dev_triggers=%u "
        "dev_unmasks=%u\n",
        (u64)intx_pin, (u64)INTX_ROUNDS, runs, ok ? -1 : (int)bad_round, (u64)level,
        (u64)(d1.intx_triggers - d0.intx_triggers), (u64)(d1.intx_unmasks - d0.intx_unmasks));

    /* 2: re-fire while the line is high: runs 1..n-1 read INTX_STATUS (a trapped access,
       after which CH sends SET_IRQS(INTx, UNMASK) and the device re-fires), run n de-asserts. */
    set_action(VEC_INTX, ACT_EOI | ACT_DEASSERT_AFTER | ACT_TOUCH_BAR0, INTX_REFIRES, 0);
    d0 = dcnt_read();
    c0 = counts[VEC_INTX];
    wr32(bar0 + R_INTX_ASSERT, 1);
    wait_count(VEC_INTX, c0 + INTX_REFIRES, WAIT_MS);
    delay_ms(SETTLE_MS);
    runs = counts[VEC_INTX] - c0;
    d1 = dcnt_read();
    level = rd32(bar0 + R_INTX_STATUS);
    ok = runs == INTX_REFIRES && (level & 1) == 0 &&
         d1.intx_triggers - d0.intx_triggers == INTX_REFIRES + 1 &&
         d1.intx_unmasks - d0.intx_unmasks == INTX_REFIRES + 1;
    result("intx-refire", ok);
    out("handler_runs=%u expected=%u status=%x dev_triggers=%u dev_unmasks=%u\n", runs,
        (u64)INTX_REFIRES, (u64)level, (u64)(d1.intx_triggers - d0.intx_triggers),
        (u64)(d1.intx_unmasks - d0.intx_unmasks));

    /* 3: a handler that only EOIs (no trapped access): the device keeps the line masked, so
       nothing re-fires until the guest touches a BAR; each trapped access then re-fires once. */
    set_action(VEC_INTX, ACT_EOI, 0, 0);
    d0 = dcnt_read();
    c0 = counts[VEC_INTX];
    wr32(bar0 + R_INTX_ASSERT, 1);
    wait_count(VEC_INTX, c0 + 1, WAIT_MS);
    delay_ms(SETTLE_MS);
    u64 after_assert = counts[VEC_INTX] - c0;
    (void)rd32(bar0 + R_MAGIC); /* trapped read: CH unmasks, the device re-fires */
    wait_count(VEC_INTX, c0 + 2, WAIT_MS);
    delay_ms(SETTLE_MS);
    u64 after_access = counts[VEC_INTX] - c0;
    set_action(VEC_INTX, ACT_EOI | ACT_DEASSERT_AFTER, 1, 0);
    (void)rd32(bar0 + R_MAGIC);
    wait_count(VEC_INTX, c0 + 3, WAIT_MS);
    delay_ms(SETTLE_MS);
    u64 after_deassert = counts[VEC_INTX] - c0;
    d1 = dcnt_read();
    level = rd32(bar0 + R_INTX_STATUS);
    ok = after_assert == 1 && after_access == 2 && after_deassert == 3 && (level & 1) == 0 &&
         d1.intx_triggers - d0.intx_triggers == 4 && d1.intx_unmasks - d0.intx_unmasks == 4;
    result("intx-unmask-on-access", ok);
    out("runs_after_assert=%u runs_after_bar_read=%u runs_after_deassert=%u status=%x "
        "dev_triggers=%u dev_unmasks=%u\n",
        after_assert, after_access, after_deassert, (u64)level,
        (u64)(d1.intx_triggers - d0.intx_triggers), (u64)(d1.intx_unmasks - d0.intx_unmasks));

    /* 4: COMMAND.10 (INTx disable) is forwarded by CH: asserting with it set fires nothing and
       STATUS.3 shows the level; clearing it fires once. */
    set_action(VEC_INTX, ACT_EOI | ACT_DEASSERT_AFTER, 1, 0);
    c0 = counts[VEC_INTX];
    cfg_wr(slot, 0x04, 0x0406);
    wr32(bar0 + R_INTX_ASSERT, 1);
    delay_ms(SETTLE_MS);
    u64 while_disabled = counts[VEC_INTX] - c0;
    u32 status = cfg_rd(slot, 0x04) >> 16;
    cfg_wr(slot, 0x04, 0x0006);
    wait_count(VEC_INTX, c0 + 1, WAIT_MS);
    delay_ms(SETTLE_MS);
    u64 after_enable = counts[VEC_INTX] - c0;
    level = rd32(bar0 + R_INTX_STATUS);
    ok = while_disabled == 0 && (status & 0x8) && after_enable == 1 && (level & 1) == 0;
    result("intx-disable", ok);
    out("runs_while_disabled=%u status_reg=%x runs_after_enable=%u intx_status=%x\n",
        while_disabled, (u64)status, after_enable, (u64)level);

    ioapic_route(intx_pin, VEC_INTX, 1);
    set_action(VEC_INTX, 0, 0, 0);
}

/* Scenario: MSI-X through CH's table (BAR2), fired by MSIX_FIRE. */
static void scenario_msix(void)
{
    for (unsigned i = 0; i < NVEC; i++)
        set_action(VEC_MSIX0 + i, ACT_EOI, 0, 0);
    msix_ctl_write(MSIX_ENABLE | MSIX_FMASK);
    for (unsigned i = 0; i < NVEC; i++)
        msix_entry(i, VEC_MSIX0 + i, 0);
    msix_ctl_write(MSIX_ENABLE);

    u64 before[NVEC];
    for (unsigned i = 0; i < NVEC; i++)
        before[i] = counts[VEC_MSIX0 + i];
    u64 intx0 = counts[VEC_INTX];
    struct dcnt d0 = dcnt_read();
    for (unsigned i = 0; i < NVEC; i++) {
        for (unsigned k = 0; k < MSIX_FIRES; k++) {
            u64 c = counts[VEC_MSIX0 + i];
            wr32(bar0 + R_MSIX_FIRE, i);
            wait_count(VEC_MSIX0 + i, c + 1, WAIT_MS);
        }
    }
    delay_ms(SETTLE_MS);
    struct dcnt d1 = dcnt_read();
    int ok = 1;
    unsigned bad = NVEC;
    for (unsigned i = 0; i < NVEC; i++) {
        if (counts[VEC_MSIX0 + i] - before[i] != MSIX_FIRES && ok) {
            ok = 0;
            bad = i;
        }
    }
    u32 trig = d1.msix_triggers - d0.msix_triggers, pend = d1.msix_pending - d0.msix_pending;
    ok = ok && trig == NVEC * MSIX_FIRES && pend == 0 && counts[VEC_INTX] == intx0 &&
         msix_ctl_read() == (MSIX_ENABLE | (NVEC - 1));
    result("msix", ok);
    out("vectors=%u fires_each=%u first_bad_vector=%d bad_vector_runs=%u dev_triggers=%u "
        "dev_pending=%u intx_runs=%u msix_ctl=%x\n",
        (u64)NVEC, (u64)MSIX_FIRES, bad == NVEC ? -1 : (int)bad,
        bad == NVEC ? 0 : counts[VEC_MSIX0 + bad] - before[bad], (u64)trig, (u64)pend,
        counts[VEC_INTX] - intx0, (u64)msix_ctl_read());
}

/* Scenario: a vector masked in CH's table (vector-control bit). What CH does is recorded. */
static void scenario_msix_table_mask(void)
{
    const unsigned i = 5, v = VEC_MSIX0 + 5;
    struct dcnt d0 = dcnt_read();
    u64 c0 = counts[v];
    wr32(bar2 + 16 * i + 12, 1);
    wr32(bar0 + R_MSIX_FIRE, i);
    wait_count(v, c0 + 1, SETTLE_MS);
    delay_ms(SETTLE_MS);
    u64 while_masked = counts[v] - c0;
    u32 pba = pba_bit(i);
    u32 ctrl = rd32(bar2 + 16 * i + 12);
    struct dcnt d1 = dcnt_read();
    wr32(bar2 + 16 * i + 12, 0);
    wait_count(v, c0 + 1, SETTLE_MS);
    delay_ms(SETTLE_MS);
    u64 total = counts[v] - c0;
    struct dcnt d2 = dcnt_read();
    u32 trig = d1.msix_triggers - d0.msix_triggers, pend = d1.msix_pending - d0.msix_pending;
    /* Either the mask never reaches the device (delivered while masked, PBA 0, nothing on
       unmask) or it does (held, pending, delivered once on unmask): exact either way. */
    int not_honoured = while_masked == 1 && total == 1 && pba == 0 && trig == 1 && pend == 0;
    int honoured = while_masked == 0 && total == 1;
    int ok = (not_honoured || honoured) && ctrl == 1 && d2.msix_pending == d1.msix_pending;
    result("msix-table-mask", ok);
    out("vector=%u runs_while_masked=%u runs_total=%u pba_bit=%u entry_ctrl=%x dev_triggers=%u "
        "dev_pending=%u\n",
        (u64)i, while_masked, total, (u64)pba, (u64)ctrl, (u64)trig, (u64)pend);
    out("INFO ch-msix-table-mask %s\n",
        not_honoured ? "not honoured: a vector masked in CH's table was delivered while masked "
                       "(PBA 0, the device never saw the mask)"
                     : honoured ? "honoured: held while masked, delivered once on unmask"
                                : "inconsistent");
}

/* Scenario: Function Mask in Message Control (forwarded to the device): the device holds the
   event in its PBA and delivers it once when the mask is cleared. */
static void scenario_msix_function_mask(void)
{
    const unsigned i = 6, v = VEC_MSIX0 + 6;
    struct dcnt d0 = dcnt_read();
    u64 c0 = counts[v];
    msix_ctl_write(MSIX_ENABLE | MSIX_FMASK);
    wr32(bar0 + R_MSIX_FIRE, i);
    delay_ms(SETTLE_MS);
    u64 while_masked = counts[v] - c0;
    u32 pba = pba_bit(i);
    struct dcnt d1 = dcnt_read();
    msix_ctl_write(MSIX_ENABLE);
    wait_count(v, c0 + 1, WAIT_MS);
    delay_ms(SETTLE_MS);
    u64 total = counts[v] - c0;
    u32 pba_after = pba_bit(i);
    struct dcnt d2 = dcnt_read();
    u32 pend = d1.msix_pending - d0.msix_pending;
    u32 trig = d2.msix_triggers - d0.msix_triggers;
    int ok = while_masked == 0 && total == 1 && pba == 1 && pba_after == 0 && pend == 1 &&
             trig == 1;
    result("msix-function-mask", ok);
    out("vector=%u runs_while_masked=%u runs_total=%u pba_while_masked=%u pba_after=%u "
        "dev_pending=%u dev_triggers=%u\n",
        (u64)i, while_masked, total, (u64)pba, (u64)pba_after, (u64)pend, (u64)trig);
}

/* Scenario: the device's own mask registers (MSIX_MASK / MSIX_UNMASK on BAR0): PBA through
   CH's forwarded PBA reads, exactly one delivery on unmask. */
static void scenario_msix_device_mask(void)
{
    const unsigned i = 7, v = VEC_MSIX0 + 7;
    struct dcnt d0 = dcnt_read();
    u64 c0 = counts[v];
    wr32(bar0 + R_MSIX_MASK, i);
    wr32(bar0 + R_MSIX_FIRE, i);
    wr32(bar0 + R_MSIX_FIRE, i);
    delay_ms(SETTLE_MS);
    u64 while_masked = counts[v] - c0;
    u32 pba = pba_bit(i);
    wr32(bar0 + R_MSIX_UNMASK, i);
    wait_count(v, c0 + 1, WAIT_MS);
    delay_ms(SETTLE_MS);
    u64 total = counts[v] - c0;
    u32 pba_after = pba_bit(i);
    struct dcnt d1 = dcnt_read();
    u32 pend = d1.msix_pending - d0.msix_pending, trig = d1.msix_triggers - d0.msix_triggers;
    int ok = while_masked == 0 && total == 1 && pba == 1 && pba_after == 0 && pend == 2 &&
             trig == 1;
    result("msix-device-mask", ok);
    out("vector=%u fires_while_masked=2 runs_while_masked=%u runs_total=%u pba_while_masked=%u "
        "pba_after=%u dev_pending=%u dev_triggers=%u\n",
        (u64)i, while_masked, total, (u64)pba, (u64)pba_after, (u64)pend, (u64)trig);
}

/* Cycles per 32-bit read at base + off: the median of 9 batches of 64 reads. A batch keeps the
   cost of rdtsc itself (an exit on some nested hypervisors) out of the figure. */
static u64 cycles_per_read(u64 base, unsigned off)
{
    u64 t[9];
    for (unsigned k = 0; k < 9; k++) {
        u64 a = rdtsc();
        for (unsigned r = 0; r < 64; r++)
            (void)rd32(base + off);
        t[k] = (rdtsc() - a) / 64;
    }
    for (unsigned a = 1; a < 9; a++)
        for (unsigned b = a; b > 0 && t[b - 1] > t[b]; b--) {
            u64 x = t[b];
            t[b] = t[b - 1];
            t[b - 1] = x;
        }
    return t[4];
}

/* Scenario: Xen-style event channels on the BAR4 page that CH maps into the guest. */
static void scenario_evtchn(void)
{
    static const unsigned ports[] = {3, 64, 700, 1000};
    static const unsigned upcall[] = {UPCALL_A, UPCALL_A, UPCALL_B, UPCALL_A};
    const unsigned n = 4;
    const unsigned va = VEC_MSIX0 + UPCALL_A, vb = VEC_MSIX0 + UPCALL_B;
    set_action(va, ACT_EOI | ACT_EVTCHN, 0, UPCALL_A);
    set_action(vb, ACT_EOI | ACT_EVTCHN, 0, UPCALL_B);
    for (unsigned k = 0; k < n; k++)
        port_count[ports[k]] = 0;

    /* Bind: each port reports bound to its vector. */
    int bind_ok = 1;
    for (unsigned k = 0; k < n; k++) {
        wr32(bar0 + R_EVTCHN_BIND, ports[k] | upcall[k] << 16);
        wr32(bar0 + R_EVTCHN_QUERY, ports[k]);
        u32 st = rd32(bar0 + R_EVTCHN_STATUS);
        if ((st & 3) != 2 || (st >> 16) != upcall[k])
            bind_ok = 0;
    }

    /* One send per port, each delivered to its port exactly once. */
    struct dcnt d0 = dcnt_read();
    u64 a0 = counts[va], b0 = counts[vb];
    for (unsigned k = 0; k < n; k++) {
        wr32(bar0 + R_EVTCHN_SEND, ports[k]);
        wait_port(ports[k], 1, WAIT_MS);
    }
    delay_ms(SETTLE_MS);
    int ok = bind_ok;
    for (unsigned k = 0; k < n; k++)
        ok = ok && port_count[ports[k]] == 1;
    struct dcnt d1 = dcnt_read();
    u64 ua = counts[va] - a0, ub = counts[vb] - b0;
    ok = ok && ua == 3 && ub == 1 && d1.evtchn_sends - d0.evtchn_sends == n &&
         d1.evtchn_upcalls - d0.evtchn_upcalls == n;
    result("evtchn", ok);
    out("ports=3,64,700,1000 bound=%u port_counts=%u,%u,%u,%u upcalls_a=%u upcalls_b=%u "
        "dev_sends=%u dev_upcalls=%u\n",
        (u64)bind_ok, (u64)port_count[3], (u64)port_count[64], (u64)port_count[700],
        (u64)port_count[1000], ua, ub, (u64)(d1.evtchn_sends - d0.evtchn_sends),
        (u64)(d1.evtchn_upcalls - d0.evtchn_upcalls));

    /* Mask port 64 in the page (a plain store into the mapped BAR4, no exit), send twice:
       pending, no upcall; EVTCHN_UNMASK: exactly one upcall and one port event. */
    u64 mask_word = bar4 + 0x200 + 8 * (64 / 64);
    wr64(mask_word, rd64(mask_word) | 1ull << (64 % 64));
    d0 = dcnt_read();
    a0 = counts[va];
    wr32(bar0 + R_EVTCHN_SEND, 64);
    wr32(bar0 + R_EVTCHN_SEND, 64);
    delay_ms(SETTLE_MS);
    u64 masked_upcalls = counts[va] - a0;
    u32 masked_count = port_count[64];
    u64 pending = (rd64(bar4 + 8 * (64 / 64)) >> (64 % 64)) & 1;
    wr32(bar0 + R_EVTCHN_UNMASK, 64);
    wait_port(64, 2, WAIT_MS);
    delay_ms(SETTLE_MS);
    u64 mask_after = (rd64(mask_word) >> (64 % 64)) & 1;
    d1 = dcnt_read();
    ok = masked_upcalls == 0 && masked_count == 1 && pending == 1 && port_count[64] == 2 &&
         counts[va] - a0 == 1 && mask_after == 0 && d1.evtchn_sends - d0.evtchn_sends == 2 &&
         d1.evtchn_upcalls - d0.evtchn_upcalls == 1;
    result("evtchn-mask", ok);
    out("port=64 sends_while_masked=2 upcalls_while_masked=%u pending=%u port_count=%u "
        "upcalls_after_unmask=%u mask_after=%u dev_sends=%u dev_upcalls=%u\n",
        masked_upcalls, pending, (u64)port_count[64], counts[va] - a0, mask_after,
        (u64)(d1.evtchn_sends - d0.evtchn_sends), (u64)(d1.evtchn_upcalls - d0.evtchn_upcalls));

    /* The page is mapped (a KVM memory slot), not trapped: a read costs about what a RAM read
       costs, far less than a trapped BAR0 read (a VM exit plus a vfio-user round trip). */
    static volatile u32 ram_word;
    u64 tr = cycles_per_read((u64)&ram_word, 0);
    u64 t4 = cycles_per_read(bar4, 0x10), t0 = cycles_per_read(bar0, R_MAGIC);
    ok = t4 < 3 * tr && 3 * t4 < t0;
    result("evtchn-mapped", ok);
    out("ram_read_cycles=%u bar4_read_cycles=%u bar0_read_cycles=%u tsc_khz=%u\n", tr, t4, t0,
        tsc_khz);

    for (unsigned k = 0; k < n; k++)
        wr32(bar0 + R_EVTCHN_CLOSE, ports[k]);
    set_action(va, ACT_EOI, 0, 0);
    set_action(vb, ACT_EOI, 0, 0);
}

/* Scenario: INTx again after MSI-X is disabled: CH drops the MSI-X eventfds and binds the
   INTx trigger again (SET_IRQS), the device stops suppressing INTx. Leaves MSI-X enabled. */
static void scenario_intx_after_msix(void)
{
    struct dcnt d0 = dcnt_read();
    msix_ctl_write(0);
    ioapic_route(intx_pin, VEC_INTX, 0);
    set_action(VEC_INTX, ACT_EOI | ACT_DEASSERT_AFTER, 1, 0);
    u64 c0 = counts[VEC_INTX];
    wr32(bar0 + R_INTX_ASSERT, 1);
    wait_count(VEC_INTX, c0 + 1, WAIT_MS);
    delay_ms(SETTLE_MS);
    u64 runs = counts[VEC_INTX] - c0;
    u32 level = rd32(bar0 + R_INTX_STATUS);
    struct dcnt d1 = dcnt_read();
    ioapic_route(intx_pin, VEC_INTX, 1);
    set_action(VEC_INTX, 0, 0, 0);
    msix_ctl_write(MSIX_ENABLE);
    /* MSI-X works again after re-enabling (CH binds the vector eventfds again). */
    u64 m0 = counts[VEC_MSIX0 + 1];
    wr32(bar0 + R_MSIX_FIRE, 1);
    wait_count(VEC_MSIX0 + 1, m0 + 1, WAIT_MS);
    delay_ms(SETTLE_MS);
    u64 msix_runs = counts[VEC_MSIX0 + 1] - m0;
    int ok = runs == 1 && (level & 1) == 0 && d1.intx_triggers - d0.intx_triggers == 2 &&
             d1.intx_unmasks - d0.intx_unmasks == 2 && msix_runs == 1 && msix_ctl_read() == (MSIX_ENABLE | (NVEC - 1));
    result("intx-after-msix", ok);
    out("intx_runs=%u status=%x dev_triggers=%u dev_unmasks=%u msix_runs_after_reenable=%u\n",
        runs, (u64)level, (u64)(d1.intx_triggers - d0.intx_triggers),
        (u64)(d1.intx_unmasks - d0.intx_unmasks), msix_runs);
}

/* Scenario: doorbells. CH has no ioeventfd offload (no GET_REGION_IO_FDS): each one is a
   trapped REGION_WRITE. */
static void scenario_doorbell(void)
{
    u32 c0 = rd32(bar0 + R_DOORBELL_COUNT);
    u64 t = rdtsc();
    for (unsigned k = 0; k < DOORBELLS; k++)
        wr32(bar0 + R_DOORBELL, k);
    t = rdtsc() - t;
    u32 c1 = rd32(bar0 + R_DOORBELL_COUNT);
    int ok = c1 - c0 == DOORBELLS;
    result("doorbell", ok);
    out("doorbells=%u counted=%u cycles_each=%u us_each=%u\n", (u64)DOORBELLS, (u64)(c1 - c0),
        t / DOORBELLS, t * 1000 / DOORBELLS / tsc_khz);
}

static void scenario_quiet(struct dcnt start)
{
    struct dcnt end = dcnt_read();
    int ok = stray == 0 && end.bad == start.bad;
    result("no-stray", ok);
    out("stray_interrupts=%u spurious=%u dev_bad_accesses=%u\n", (u64)stray,
        counts[VEC_SPURIOUS], (u64)(end.bad - start.bad));
}

void guest_main(u64 start_info)
{
    (void)start_info;
    tsc_init();
    out("\nirqbridge PVH guest\n");
    lapic_init();
    sti();
    if (!scenario_enumerate()) {
        out("DONE boot=0 pass=%u fail=%u\n", (u64)n_pass, (u64)n_fail);
        acpi_write(ACPI_S5);
    }
    scenario_boot_state();
    struct dcnt start = dcnt_read();
    scenario_intx();
    scenario_msix();
    scenario_msix_table_mask();
    scenario_msix_function_mask();
    scenario_msix_device_mask();
    scenario_evtchn();
    scenario_doorbell();
    scenario_intx_after_msix();
    scenario_quiet(start);
    if (boot == 1) {
        /* Marks that only a device reset removes, then an ACPI reset. */
        wr32(bar0 + R_EVTCHN_BIND, MARK_PORT | MARK_VECTOR << 16);
        wr64(bar4 + 0x200 + 8 * 63, MARK_WORD);
        cli();
        out("REBOOT pass=%u fail=%u\n", (u64)n_pass, (u64)n_fail);
        acpi_write(ACPI_RESET);
    }
    cli();
    out("DONE boot=%u pass=%u fail=%u\n", (u64)boot, (u64)n_pass, (u64)n_fail);
    acpi_write(ACPI_S5);
}
