// uart16550_target.h - a SystemC/TLM-2.0 ns16550 target whose device is a uartbridge UART.
//
// Copyright (c) the uartbridge authors. MIT licence (the full text is in clients/c/uartbridge.h).
//
// Uart16550Target is a TLM-2.0 target (a tlm_utils::simple_target_socket, i.e. a
// tlm::tlm_target_socket<32>) whose b_transport turns each register access into one bus
// operation on a uartbridge daemon through libuartbridge: a read is a READ round trip, a
// write a posted WRITE. The register layout is the device tree's ns16550 one: register i
// lives at address i << reg_shift, and accesses are reg_io_width bytes wide (1 or 4; a
// 1-byte access at the register's address is accepted too). A 4-byte access carries the
// register in its low byte, in host byte order as TLM-2.0 defines data; the other bytes
// read as 0 and are ignored on writes.
//
// The IRQ output follows the bus's IRQ events: it is updated one delta after every
// transport (the event that a reply observes has arrived before the reply) and, for events between
// accesses (input from the far end), by a thread that calls ub_process() every
// poll_period of simulated time (SC_ZERO_TIME: no thread; the output then changes only at
// accesses). An edge made and undone between two updates is not seen on the signal (it is
// a level), but rising_edges() counts every rising edge the bus reported.
//
// Time: each access adds access_latency to the transaction's delay, plus, with
// annotate_host_time, the host time the bus operation took (which makes simulated time
// depend on the host, so it is off by default).
//
// A failing bus operation sets TLM_GENERIC_ERROR_RESPONSE and raises SC_REPORT_ERROR with
// libuartbridge's message. Not supported: DMI, debug transport (a debug read of RBR or IIR
// would have side effects), byte enables, streaming.
//
// Threading: everything runs in the SystemC kernel's thread; the target owns one bus
// connection, used by b_transport and its poll thread only (never at the same time: SystemC
// processes do not run concurrently).
#ifndef UARTBRIDGE_UART16550_TARGET_H
#define UARTBRIDGE_UART16550_TARGET_H

#ifndef SC_INCLUDE_DYNAMIC_PROCESSES
#define SC_INCLUDE_DYNAMIC_PROCESSES // simple_target_socket spawns processes for nb_transport
#endif

#include <chrono>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include <systemc>
#include <tlm>
#include <tlm_utils/simple_target_socket.h>

#include "uartbridge.h"

class Uart16550Target : public sc_core::sc_module {
public:
    struct Config {
        std::string bus;                       // Unix socket path or "tcp:HOST:PORT"
        unsigned reg_shift = 0;                // device tree "reg-shift"
        unsigned reg_io_width = 1;             // device tree "reg-io-width": 1 or 4
        sc_core::sc_time access_latency{100, sc_core::SC_NS};
        bool annotate_host_time = false;       // also add the measured host round trip
        sc_core::sc_time poll_period{10, sc_core::SC_US}; // SC_ZERO_TIME: no poll thread
        int timeout_ms = 10000;                // libuartbridge's bound on each wait
        unsigned spin_us = 100;                // libuartbridge's busy-poll window
    };

    tlm_utils::simple_target_socket<Uart16550Target> socket;
    sc_core::sc_out<bool> irq;

    SC_HAS_PROCESS(Uart16550Target);

    Uart16550Target(sc_core::sc_module_name name, const Config &config)
        : sc_core::sc_module(name), socket("socket"), irq("irq"), config_(config)
    {
        if (config_.reg_io_width != 1 && config_.reg_io_width != 4)
            throw std::invalid_argument("Uart16550Target: reg_io_width must be 1 or 4");
        if (config_.reg_shift > 4)
            throw std::invalid_argument("Uart16550Target: reg_shift must be 0..4");
        ub_options options;
        ub_options_init(&options);
        options.timeout_ms = config_.timeout_ms;
        options.spin_us = config_.spin_us;
        options.on_irq = &Uart16550Target::on_irq;
        options.irq_ctx = this;
        client_ = ub_new(&options);
        if (client_ == nullptr)
            throw std::bad_alloc();
        if (ub_connect(client_, config_.bus.c_str()) != UB_OK) {
            std::string message = ub_last_error(client_)->message;
            ub_free(client_);
            client_ = nullptr;
            throw std::runtime_error("Uart16550Target: " + message);
        }
        socket.register_b_transport(this, &Uart16550Target::b_transport);
        SC_METHOD(drive_irq); // runs once at the start too: the level HELLO reported
        sensitive << irq_changed_;
        if (config_.poll_period != sc_core::SC_ZERO_TIME)
            SC_THREAD(poll_thread);
    }

    ~Uart16550Target() override { ub_free(client_); }

    Uart16550Target(const Uart16550Target &) = delete;
    Uart16550Target &operator=(const Uart16550Target &) = delete;

    // Every rising edge the bus reported (for an edge-triggered interrupt controller).
    unsigned long rising_edges() const { return rising_edges_; }
    unsigned long accesses() const { return accesses_; }
    ub_client *client() { return client_; } // the connection, e.g. for ub_sync() at the end

private:
    static void on_irq(void *ctx, int level)
    {
        auto *self = static_cast<Uart16550Target *>(ctx);
        self->level_ = level != 0;
        if (level)
            self->rising_edges_++;
    }

    // The signal has one writer, drive_irq: transports run in the initiator's process and
    // polls in ours, so both only notify it (in the next delta).
    void update_irq() { irq_changed_.notify(sc_core::SC_ZERO_TIME); }

    void drive_irq() { irq.write(level_); } // the same value again is no event

    void bus_failed(tlm::tlm_generic_payload &trans, const char *what)
    {
        trans.set_response_status(tlm::TLM_GENERIC_ERROR_RESPONSE);
        std::string message = std::string(what) + ": " + ub_last_error(client_)->message;
        SC_REPORT_ERROR(name(), message.c_str());
    }

    void b_transport(tlm::tlm_generic_payload &trans, sc_core::sc_time &delay)
    {
        const uint64_t address = trans.get_address();
        const unsigned length = trans.get_data_length();
        unsigned char *data = trans.get_data_ptr();
        const uint64_t stride_mask = (uint64_t{1} << config_.reg_shift) - 1;

        if (trans.get_byte_enable_ptr() != nullptr) {
            trans.set_response_status(tlm::TLM_BYTE_ENABLE_ERROR_RESPONSE);
            return;
        }
        if ((length != 1 && length != config_.reg_io_width) ||
            trans.get_streaming_width() < length) {
            trans.set_response_status(tlm::TLM_BURST_ERROR_RESPONSE);
            return;
        }
        if ((address & stride_mask) != 0 || (address >> config_.reg_shift) > 7) {
            trans.set_response_status(tlm::TLM_ADDRESS_ERROR_RESPONSE);
            return;
        }
        const unsigned offset = static_cast<unsigned>(address >> config_.reg_shift);
        const auto started = std::chrono::steady_clock::now();
        if (trans.is_read()) {
            int value = ub_read(client_, offset);
            if (value < 0)
                return bus_failed(trans, "bus read");
            if (length == 1) {
                data[0] = static_cast<unsigned char>(value);
            } else {
                uint32_t word = static_cast<uint32_t>(value);
                std::memcpy(data, &word, sizeof word); // host byte order, as TLM-2.0 says
            }
        } else if (trans.is_write()) {
            uint32_t word = data[0];
            if (length == 4) {
                std::memcpy(&word, data, sizeof word);
                word &= 0xFF;
            }
            if (ub_write(client_, offset, word) < 0)
                return bus_failed(trans, "bus write");
        } else {
            trans.set_response_status(tlm::TLM_COMMAND_ERROR_RESPONSE);
            return;
        }
        accesses_++;
        delay += config_.access_latency;
        if (config_.annotate_host_time)
            delay += sc_core::sc_time(
                std::chrono::duration<double>(std::chrono::steady_clock::now() - started)
                    .count(),
                sc_core::SC_SEC);
        update_irq();
        trans.set_dmi_allowed(false);
        trans.set_response_status(tlm::TLM_OK_RESPONSE);
    }

    void poll_thread()
    {
        for (;;) {
            sc_core::wait(config_.poll_period);
            if (ub_process(client_) < 0) {
                SC_REPORT_ERROR(name(), ub_last_error(client_)->message);
                return;
            }
            update_irq();
        }
    }

    Config config_;
    ub_client *client_ = nullptr;
    bool level_ = false;
    sc_core::sc_event irq_changed_;
    unsigned long rising_edges_ = 0;
    unsigned long accesses_ = 0;
};

#endif // UARTBRIDGE_UART16550_TARGET_H
