// What the emulated device's driver (driver.cpp, built as libcuda.so) offers the emulated libraries
// built beside it (cublas.cpp, libcublas.so), beyond the CUDA driver API: a host-side task queued on
// a stream as a library's kernel would be, and the driver's view of device memory. Not part of any
// NVIDIA interface; the names start with ape_emu_dev_.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <cuda.h>

extern "C" {

// A library's computation, run when the stream reaches it (or at each replay of a graph that
// captured it). Returns 0, or 1 with a message in err: an access outside device memory, which the
// driver reports as an illegal address, as it would a kernel's.
typedef int (*ape_emu_dev_task_fn)(void* data, char* err, size_t err_len);

// Queues `run(data)` on `stream` (0: the context's null stream). `release(data)` is called once no
// queue or graph holds the task any more. Returns a driver error code (the task is not queued, and
// release is called, on an error).
CUresult ape_emu_dev_enqueue_task(CUstream stream, const char* name, ape_emu_dev_task_fn run,
                                  void* data, void (*release)(void*));

// 0 when [ptr, ptr + bytes) lies in one live allocation of device (or page-locked host) memory;
// else 1, with the reason in err. Safe to call from a running task.
int ape_emu_dev_check_range(uint64_t ptr, uint64_t bytes, char* err, size_t err_len);

// Whether the calling thread has a current, live context (a library handle needs one).
int ape_emu_dev_has_context(void);

// Runs everything queued on every stream (cuCtxSynchronize without a current context).
CUresult ape_emu_dev_synchronize(void);
}
