/*
 * A stand-in for libnvidia-ml.so.1, so the REAL pynvml binding runs end to end in tests.
 *
 * Two GPUs (memory values from gpu-samples.md; the rest chosen here):
 *   0: "NVIDIA GeForce RTX 4090", UUID GPU-4090aaaa-0000-0000-0000-000000000000,
 *      v2 memory total 25757220864, reserved 398458880, free 24946671616,
 *      used 412090368 (bytes); utilization 2 %; 38 C; power 123456 mW of an enforced
 *      450000 mW; clock-event reasons 0x4 (sw power cap); ECC NOT_SUPPORTED; MIG mode
 *      NOT_SUPPORTED.
 *      Compute processes: this process (getpid(), 1073741824 B) and pid 4194400 (memory
 *      NVML_VALUE_NOT_AVAILABLE). Graphics processes: this process (536870912 B) and
 *      pid 4194401 (268435456 B). Pids above 4194304 (Linux's PID_MAX_LIMIT) never exist.
 *   1: "NVIDIA A100-SXM4-80GB", UUID GPU-a100a100-0000-0000-0000-000000000000: 81920 MiB
 *      total, 45383 MiB free; utilization NOT_SUPPORTED (MIG); 33 C; power 61234 mW of
 *      400000 mW; clock-event reasons 0x1 (idle); ECC 0 uncorrected; MIG enabled, 7 slots,
 *      two 3g.40gb units (the others NOT_FOUND):
 *        slot 0: "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
 *                MIG-a100a100-0000-0000-0000-000000000000, 40192 MiB total, 20096 MiB free
 *        slot 3: same name, MIG-a100a100-0000-0000-0000-000000000003, 40192 MiB total,
 *                25287 MiB free
 *      Compute processes: pid 4194402, memory NVML_VALUE_NOT_AVAILABLE (as under MIG);
 *      no graphics processes.
 *
 * Environment (read at nvmlInitWithFlags):
 *   FAKE_NVML_INIT_RC   an NVML return code for init (e.g. 18: LIB_RM_VERSION_MISMATCH)
 *   FAKE_NVML_LOST      a device index whose queries return GPU_IS_LOST (15)
 *   FAKE_NVML_RESET     a device index whose queries return RESET_REQUIRED (16)
 *   FAKE_NVML_UNIFIED   "1": device 0 is "NVIDIA GB10" (UUID GPU-gb10gb10-...), whose
 *                       memory queries return NOT_SUPPORTED (unified memory, DGX Spark)
 *   FAKE_NVML_POWER_RC  an NVML return code for device 0's nvmlDeviceGetPowerUsage
 * Compile with -DFAKE_NVML_R470 for an R470-era driver: no nvmlDeviceGetMemoryInfo_v2, no
 * nvmlDevice*RunningProcesses_v3 (only _v2), no nvmlDeviceGetCurrentClocksEventReasons
 * (only ...ThrottleReasons). The binding then raises NVMLError_FunctionNotFound (or, for
 * its unversioned process wrappers, NVMLLibraryMismatchError).
 *
 * The process functions take the binding's c_nvmlProcessInfo_v2_t (== _v3_t) layout:
 * {unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId;
 * unsigned int computeInstanceId;}. The binding calls first with *count == 0 and NULL
 * (expecting INSUFFICIENT_SIZE and the count, or SUCCESS for none), then with an array.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_RESET_REQUIRED 16
#define NOT_AVAILABLE 0xFFFFFFFFFFFFFFFFULL
#define TOP_LEVEL 2 /* devices 0 and 1; entries 2 and 3 are MIG units of device 1 */
#define MIG_SLOTS 7

typedef struct { int index; } fake_device;
typedef fake_device *nvmlDevice_t;

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    unsigned int pid; /* 0: this process */
    unsigned long long used;
} fake_process;

static fake_device devices[4] = {{0}, {1}, {2}, {3}};
static const int parent[4] = {-1, -1, 1, 1};
static const int mig_slot_device[MIG_SLOTS] = {2, -1, -1, 3, -1, -1, -1};
static int initialised = 0;
static int lost = -1;
static int reset = -1;
static int unified = 0;
static int power_rc = 0;

static const char *names[4] = {
    "NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB",
    "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "NVIDIA A100-SXM4-80GB MIG 3g.40gb"};
static const char *uuids[4] = {
    "GPU-4090aaaa-0000-0000-0000-000000000000", "GPU-a100a100-0000-0000-0000-000000000000",
    "MIG-a100a100-0000-0000-0000-000000000000", "MIG-a100a100-0000-0000-0000-000000000003"};
static const unsigned long long total[4] = {25757220864ULL, 81920ULL << 20,
                                            40192ULL << 20, 40192ULL << 20};
static const unsigned long long reserved[4] = {398458880ULL, 0ULL, 0ULL, 0ULL};
static const unsigned long long freemem[4] = {24946671616ULL, 45383ULL << 20,
                                              20096ULL << 20, 25287ULL << 20};
static const unsigned long long used[4] = {412090368ULL, (81920ULL - 45383ULL) << 20,
                                           (40192ULL - 20096ULL) << 20,
                                           (40192ULL - 25287ULL) << 20};
static const int utilization[2] = {2, -1};
static const unsigned int temperature[2] = {38, 33};
static const unsigned int power_mw[2] = {123456, 61234};
static const unsigned int power_limit_mw[2] = {450000, 400000};
static const unsigned long long event_reasons[2] = {0x4ULL, 0x1ULL};
static const fake_process compute[2][2] = {{{0, 1073741824ULL}, {4194400, NOT_AVAILABLE}},
                                           {{4194402, NOT_AVAILABLE}, {0, 0}}};
static const unsigned int compute_count[2] = {2, 1};
static const fake_process graphics[2][2] = {{{0, 536870912ULL}, {4194401, 268435456ULL}},
                                            {{0, 0}, {0, 0}}};
static const unsigned int graphics_count[2] = {2, 0};

/* 0 when `device` may be queried; else the NVML error. Any device or MIG unit. */
static int check(nvmlDevice_t device) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (device == NULL || device->index < 0 || device->index > 3)
        return NVML_ERROR_INVALID_ARGUMENT;
    int gpu = parent[device->index] < 0 ? device->index : parent[device->index];
    if (gpu == lost) return NVML_ERROR_GPU_IS_LOST;
    if (gpu == reset) return NVML_ERROR_RESET_REQUIRED;
    return NVML_SUCCESS;
}

/* Like check(), for a top-level GPU only (not a MIG unit). */
static int check_gpu(nvmlDevice_t device) {
    int rc = check(device);
    if (rc != NVML_SUCCESS) return rc;
    return device->index < TOP_LEVEL ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}

static int env_int(const char *name, int fallback) {
    const char *value = getenv(name);
    return value != NULL ? atoi(value) : fallback;
}

int nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    int rc = env_int("FAKE_NVML_INIT_RC", 0);
    if (rc != 0) return rc;
    lost = env_int("FAKE_NVML_LOST", -1);
    reset = env_int("FAKE_NVML_RESET", -1);
    unified = env_int("FAKE_NVML_UNIFIED", 0);
    power_rc = env_int("FAKE_NVML_POWER_RC", 0);
    initialised = 1;
    return NVML_SUCCESS;
}

int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

int nvmlShutdown(void) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    initialised = 0;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(int result) {
    switch (result) {
        case 0: return "Success";
        case 3: return "Not Supported";
        case 6: return "Not Found";
        case 7: return "Insufficient Size";
        case 13: return "Function Not Found";
        case 15: return "GPU is lost";
        case 16: return "GPU requires restart";
        case 18: return "RM has detected an NVML/RM version mismatch.";
        default: return "Unknown Error";
    }
}

int nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    *count = TOP_LEVEL;
    return NVML_SUCCESS;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (index >= TOP_LEVEL) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

static int copy_text(const char *text, char *out, unsigned int length) {
    if (length == 0) return NVML_ERROR_INVALID_ARGUMENT;
    strncpy(out, text, length - 1);
    out[length - 1] = '\0';
    return NVML_SUCCESS;
}

int nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    int rc = check(device);
    if (rc != NVML_SUCCESS) return rc;
    if (unified && device->index == 0) return copy_text("NVIDIA GB10", name, length);
    return copy_text(names[device->index], name, length);
}

int nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    int rc = check(device);
    if (rc != NVML_SUCCESS) return rc;
    if (unified && device->index == 0)
        return copy_text("GPU-gb10gb10-0000-0000-0000-000000000000", uuid, length);
    return copy_text(uuids[device->index], uuid, length);
}

static int check_memory(nvmlDevice_t device) {
    int rc = check(device);
    if (rc != NVML_SUCCESS) return rc;
    if (unified && device->index == 0) return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    int rc = check_memory(device);
    if (rc != NVML_SUCCESS) return rc;
    int i = device->index;
    memory->total = total[i];
    memory->free = freemem[i];
    memory->used = used[i] + reserved[i];
    return NVML_SUCCESS;
}

#ifndef FAKE_NVML_R470
int nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    int rc = check_memory(device);
    if (rc != NVML_SUCCESS) return rc;
    int i = device->index;
    memory->total = total[i];
    memory->reserved = reserved[i];
    memory->free = freemem[i];
    memory->used = used[i];
    return NVML_SUCCESS;
}
#endif

int nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *util) {
    int rc = check_gpu(device);
    if (rc != NVML_SUCCESS) return rc;
    if (utilization[device->index] < 0) return NVML_ERROR_NOT_SUPPORTED;
    util->gpu = (unsigned int)utilization[device->index];
    util->memory = 0;
    return NVML_SUCCESS;
}

int nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temp) {
    int rc = check_gpu(device);
    if (rc != NVML_SUCCESS) return rc;
    if (sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = temperature[device->index];
    return NVML_SUCCESS;
}

int nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    int rc = check_gpu(device);
    if (rc != NVML_SUCCESS) return rc;
    if (device->index == 0 && power_rc != 0) return power_rc;
    *power = power_mw[device->index];
    return NVML_SUCCESS;
}

int nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit) {
    int rc = check_gpu(device);
    if (rc != NVML_SUCCESS) return rc;
    *limit = power_limit_mw[device->index];
    return NVML_SUCCESS;
}

int nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device,
                                              unsigned long long *reasons) {
    int rc = check_gpu(device);
    if (rc != NVML_SUCCESS) return rc;
    *reasons = event_reasons[device->index];
    return NVML_SUCCESS;
}

#ifndef FAKE_NVML_R470
int nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                           unsigned long long *reasons) {
    return nvmlDeviceGetCurrentClocksThrottleReasons(device, reasons);
}
#endif

int nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, unsigned int error_type,
                                unsigned int counter_type, unsigned long long *count) {
    int rc = check_gpu(device);
    if (rc != NVML_SUCCESS) return rc;
    if (error_type > 1 || counter_type > 1) return NVML_ERROR_INVALID_ARGUMENT;
    if (device->index == 0) return NVML_ERROR_NOT_SUPPORTED;
    *count = 0;
    return NVML_SUCCESS;
}

static int list_processes(nvmlDevice_t device, unsigned int *count, nvmlProcessInfo_t *infos,
                          const fake_process table[2][2], const unsigned int counts[2]) {
    int rc = check_gpu(device);
    if (rc != NVML_SUCCESS) return rc;
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int n = counts[device->index];
    if (n == 0) {
        *count = 0;
        return NVML_SUCCESS;
    }
    if (infos == NULL || *count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (unsigned int i = 0; i < n; i++) {
        const fake_process *p = &table[device->index][i];
        infos[i].pid = p->pid != 0 ? p->pid : (unsigned int)getpid();
        infos[i].usedGpuMemory = p->used;
        infos[i].gpuInstanceId = 0xFFFFFFFFu;
        infos[i].computeInstanceId = 0xFFFFFFFFu;
    }
    *count = n;
    return NVML_SUCCESS;
}

int nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *count,
                                            nvmlProcessInfo_t *infos) {
    return list_processes(device, count, infos, compute, compute_count);
}

int nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t device, unsigned int *count,
                                             nvmlProcessInfo_t *infos) {
    return list_processes(device, count, infos, graphics, graphics_count);
}

#ifndef FAKE_NVML_R470
int nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                            nvmlProcessInfo_t *infos) {
    return list_processes(device, count, infos, compute, compute_count);
}

int nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                             nvmlProcessInfo_t *infos) {
    return list_processes(device, count, infos, graphics, graphics_count);
}
#endif

int nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    int rc = check_gpu(device);
    if (rc != NVML_SUCCESS) return rc;
    if (device->index != 1) return NVML_ERROR_NOT_SUPPORTED;
    *current = 1;
    *pending = 1;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    int rc = check_gpu(device);
    if (rc != NVML_SUCCESS) return rc;
    *count = device->index == 1 ? MIG_SLOTS : 0;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                        nvmlDevice_t *mig) {
    int rc = check_gpu(device);
    if (rc != NVML_SUCCESS) return rc;
    if (device->index != 1) return NVML_ERROR_NOT_SUPPORTED;
    if (index >= MIG_SLOTS) return NVML_ERROR_INVALID_ARGUMENT;
    if (mig_slot_device[index] < 0) return NVML_ERROR_NOT_FOUND;
    *mig = &devices[mig_slot_device[index]];
    return NVML_SUCCESS;
}
