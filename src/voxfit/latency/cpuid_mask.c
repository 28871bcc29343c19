/* CPUID as a smaller x86 CPU reports it, for this process (voxfit.latency._isa).
 *
 * Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, 0) makes the CPUID instruction trap
 * with SIGSEGV (si_code SI_KERNEL) in the calling thread and every thread it starts later.
 * The handler runs the real CPUID with faulting briefly off, clears the masked feature bits
 * and steps over the 2-byte instruction. Other SIGSEGVs go to the handler installed before
 * (Python's faulthandler, or the default action). Faulting ends at execve: child programs
 * see the whole CPU.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define MAX_MASKS 64

/* reg: 0 eax, 1 ebx, 2 ecx, 3 edx; subleaf ANY_SUBLEAF: a leaf that ignores ecx */
struct mask { uint32_t leaf, subleaf, reg, bits; };
#define ANY_SUBLEAF 0xffffffffu

static struct mask masks[MAX_MASKS];
static int n_masks;
static struct sigaction previous;
static volatile long trapped;

static void real_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
                     : "a"(leaf), "c"(subleaf));
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t leaf = (uint32_t)g[REG_RAX], subleaf = (uint32_t)g[REG_RCX], r[4];
        int saved = errno;
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
        real_cpuid(leaf, subleaf, r);
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
        errno = saved;
        for (int i = 0; i < n_masks; i++)
            if (masks[i].leaf == leaf &&
                (masks[i].subleaf == ANY_SUBLEAF || masks[i].subleaf == subleaf))
                r[masks[i].reg] &= ~masks[i].bits;
        g[REG_RAX] = r[0];
        g[REG_RBX] = r[1];
        g[REG_RCX] = r[2];
        g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        trapped++;
        return;
    }
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL); /* returning re-runs the faulting instruction: default action */
    }
}

/* Mask `n` (leaf, subleaf, reg, bits) quadruples from now on. Returns 0, or an errno:
 * EINVAL (too many masks), or arch_prctl's (ENODEV: the CPU or hypervisor has no CPUID
 * faulting). Calling it again replaces the masks. */
int voxfit_cpuid_mask(int n, const uint32_t *quads) {
    if (n < 0 || n > MAX_MASKS) return EINVAL;
    for (int i = 0; i < n; i++) {
        masks[i].leaf = quads[4 * i];
        masks[i].subleaf = quads[4 * i + 1];
        masks[i].reg = quads[4 * i + 2] & 3;
        masks[i].bits = quads[4 * i + 3];
    }
    n_masks = n;
    if (syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0) == 0) return 0; /* already faulting */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, &previous) != 0) return errno;
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        int err = errno;
        sigaction(SIGSEGV, &previous, NULL);
        return err;
    }
    return 0;
}

/* CPUID as this process now sees it (through the trap when faulting is on). */
void voxfit_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *r) { real_cpuid(leaf, subleaf, r); }

long voxfit_cpuid_trapped(void) { return trapped; }
