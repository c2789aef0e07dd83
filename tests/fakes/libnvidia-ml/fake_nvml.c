/*
 * A stand-in for libnvidia-ml.so.1, so the REAL pynvml binding runs end to end in tests.
 *
 * Two GPUs (values from gpu-samples.md):
 *   0: "NVIDIA GeForce RTX 4090", v2 memory total 25757220864, reserved 398458880,
 *      free 24946671616, used 412090368 (bytes); utilization 2 %; 38 C.
 *   1: "NVIDIA A100-SXM4-80GB" (MIG): 81920 MiB total, 45383 MiB free; utilization
 *      NOT_SUPPORTED; 33 C.
 *
 * Environment (read at nvmlInitWithFlags):
 *   FAKE_NVML_INIT_RC   an NVML return code for init (e.g. 18: LIB_RM_VERSION_MISMATCH)
 *   FAKE_NVML_LOST      a device index whose queries return GPU_IS_LOST (15)
 * Compile with -DFAKE_NVML_NO_MEMORY_V2 to leave nvmlDeviceGetMemoryInfo_v2 out (an old
 * driver): the binding then raises NVMLError_FunctionNotFound for the versioned call.
 */
#include <stdlib.h>
#include <string.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_GPU_IS_LOST 15

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

static fake_device devices[2] = {{0}, {1}};
static int initialised = 0;
static int lost = -1;

static const char *names[2] = {"NVIDIA GeForce RTX 4090", "NVIDIA A100-SXM4-80GB"};
static const unsigned long long total[2] = {25757220864ULL, 81920ULL << 20};
static const unsigned long long reserved[2] = {398458880ULL, 0ULL};
static const unsigned long long freemem[2] = {24946671616ULL, 45383ULL << 20};
static const unsigned long long used[2] = {412090368ULL, (81920ULL - 45383ULL) << 20};
static const int utilization[2] = {2, -1};
static const unsigned int temperature[2] = {38, 33};

static int check(nvmlDevice_t device) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (device == NULL || device->index < 0 || device->index > 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->index == lost) return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

int nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    const char *rc = getenv("FAKE_NVML_INIT_RC");
    const char *gone = getenv("FAKE_NVML_LOST");
    if (rc != NULL && atoi(rc) != 0) return atoi(rc);
    lost = gone != NULL ? atoi(gone) : -1;
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
        case 15: return "GPU is lost";
        case 18: return "RM has detected an NVML/RM version mismatch.";
        default: return "Unknown Error";
    }
}

int nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    *count = 2;
    return NVML_SUCCESS;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialised) return NVML_ERROR_UNINITIALIZED;
    if (index > 1) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

int nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    int rc = check(device);
    if (rc != NVML_SUCCESS) return rc;
    if (length == 0) return NVML_ERROR_INVALID_ARGUMENT;
    strncpy(name, names[device->index], length - 1);
    name[length - 1] = '\0';
    return NVML_SUCCESS;
}

int nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    int rc = check(device);
    if (rc != NVML_SUCCESS) return rc;
    int i = device->index;
    memory->total = total[i];
    memory->free = freemem[i];
    memory->used = used[i] + reserved[i];
    return NVML_SUCCESS;
}

#ifndef FAKE_NVML_NO_MEMORY_V2
int nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    int rc = check(device);
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
    int rc = check(device);
    if (rc != NVML_SUCCESS) return rc;
    if (utilization[device->index] < 0) return NVML_ERROR_NOT_SUPPORTED;
    util->gpu = (unsigned int)utilization[device->index];
    util->memory = 0;
    return NVML_SUCCESS;
}

int nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temp) {
    int rc = check(device);
    if (rc != NVML_SUCCESS) return rc;
    if (sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = temperature[device->index];
    return NVML_SUCCESS;
}
