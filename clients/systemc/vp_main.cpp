// vp_main.cpp - an example virtual platform on Uart16550Target.
//
// Copyright (c) the uartbridge authors. MIT licence (the full text is in clients/c/uartbridge.h).
//
//   uartbridge_vp BUS [--reg-shift N] [--reg-io-width 1|4] [--banner TEXT] [--check-errors]
//
// A small initiator drives the UART as a polled ns16550 driver does (a boot loader's or an
// early console's): it sets 115200 8N1 with FIFOs, writes a byte only once LSR.THRE is set
// and reads RBR only once LSR.DR is set. It prints the banner, then echoes every byte the
// far end sends until the far end sends EOT (0x04), waits for LSR.TEMT (everything sent),
// prints a summary line and stops. IER enables the receive interrupt, so the target's IRQ
// output moves as bytes come in; a method counts its rising edges.
#define SC_INCLUDE_DYNAMIC_PROCESSES
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include <systemc>
#include <tlm>
#include <tlm_utils/simple_initiator_socket.h>

#include "uart16550_target.h"

namespace {

const unsigned EOT = 0x04;

struct PolledDriver : sc_core::sc_module {
    tlm_utils::simple_initiator_socket<PolledDriver> socket;
    sc_core::sc_in<bool> irq;

    SC_HAS_PROCESS(PolledDriver);

    PolledDriver(sc_core::sc_module_name name, unsigned reg_shift, unsigned width,
                 std::string banner, bool check_errors)
        : sc_core::sc_module(name), socket("socket"), irq("irq"), reg_shift_(reg_shift),
          width_(width), banner_(std::move(banner)), check_errors_(check_errors)
    {
        SC_THREAD(run);
        SC_METHOD(count_irq);
        sensitive << irq.pos();
        dont_initialize();
    }

    unsigned long echoed = 0, irq_rises = 0;

private:
    tlm::tlm_response_status access(tlm::tlm_command command, uint64_t address,
                                    unsigned length, unsigned char *data,
                                    unsigned char *byte_enables = nullptr)
    {
        tlm::tlm_generic_payload trans;
        sc_core::sc_time delay = sc_core::SC_ZERO_TIME;
        trans.set_command(command);
        trans.set_address(address);
        trans.set_data_ptr(data);
        trans.set_data_length(length);
        trans.set_streaming_width(length);
        trans.set_byte_enable_ptr(byte_enables);
        trans.set_byte_enable_length(byte_enables ? length : 0);
        trans.set_response_status(tlm::TLM_INCOMPLETE_RESPONSE);
        socket->b_transport(trans, delay);
        sc_core::wait(delay); // loosely timed, synchronised at every access
        return trans.get_response_status();
    }

    unsigned reg_read(unsigned offset)
    {
        unsigned char data[4] = {0, 0, 0, 0};
        if (access(tlm::TLM_READ_COMMAND, uint64_t{offset} << reg_shift_, width_, data) !=
            tlm::TLM_OK_RESPONSE)
            SC_REPORT_FATAL(name(), "register read failed");
        uint32_t word = data[0];
        if (width_ == 4)
            std::memcpy(&word, data, sizeof word);
        return word & 0xFF;
    }

    void reg_write(unsigned offset, unsigned value)
    {
        unsigned char data[4] = {0, 0, 0, 0};
        uint32_t word = value;
        if (width_ == 4)
            std::memcpy(data, &word, sizeof word);
        else
            data[0] = static_cast<unsigned char>(value);
        if (access(tlm::TLM_WRITE_COMMAND, uint64_t{offset} << reg_shift_, width_, data) !=
            tlm::TLM_OK_RESPONSE)
            SC_REPORT_FATAL(name(), "register write failed");
    }

    void put(unsigned ch)
    {
        while (!(reg_read(UB_LSR) & UB_LSR_THRE)) {
        }
        reg_write(UB_THR, ch);
    }

    unsigned get()
    {
        while (!(reg_read(UB_LSR) & UB_LSR_DR)) {
        }
        return reg_read(UB_RBR);
    }

    void expect(tlm::tlm_response_status got, tlm::tlm_response_status want, const char *what)
    {
        if (got != want) {
            std::string message = std::string(what) + ": unexpected response";
            SC_REPORT_FATAL(name(), message.c_str());
        }
    }

    // The target refuses what a ns16550 on this bus cannot be: wrong alignment, an offset
    // beyond the 8 registers, a 2-byte access, byte enables.
    void check_error_responses()
    {
        unsigned char data[4] = {0, 0, 0, 0}, enables[4] = {0xFF, 0, 0, 0};
        if (reg_shift_ > 0)
            expect(access(tlm::TLM_READ_COMMAND, 1, 1, data), tlm::TLM_ADDRESS_ERROR_RESPONSE,
                   "misaligned read");
        expect(access(tlm::TLM_READ_COMMAND, uint64_t{8} << reg_shift_, 1, data),
               tlm::TLM_ADDRESS_ERROR_RESPONSE, "read beyond the registers");
        expect(access(tlm::TLM_READ_COMMAND, 0, 2, data), tlm::TLM_BURST_ERROR_RESPONSE,
               "2-byte read");
        expect(access(tlm::TLM_WRITE_COMMAND, uint64_t{UB_SCR} << reg_shift_, 1, data,
                      enables),
               tlm::TLM_BYTE_ENABLE_ERROR_RESPONSE, "write with byte enables");
        std::printf("vp: error responses ok\n");
    }

    void run()
    {
        if (check_errors_)
            check_error_responses();
        reg_write(UB_LCR, UB_LCR_DLAB | 0x03); // 8N1, divisor latch
        reg_write(UB_DLL, 1);                  // 115200 baud from 1.8432 MHz
        reg_write(UB_DLM, 0);
        reg_write(UB_LCR, 0x03);
        reg_write(UB_FCR, 0x07);               // FIFOs on and cleared
        reg_write(UB_MCR, 0x0B);               // DTR, RTS, OUT2 (the PC's IRQ gate)
        reg_write(UB_IER, UB_IER_RDI);
        for (char ch : banner_)
            put(static_cast<unsigned char>(ch));
        for (;;) {
            unsigned ch = get();
            if (ch == EOT)
                break;
            put(ch);
            echoed++;
        }
        while (!(reg_read(UB_LSR) & UB_LSR_TEMT)) { // a console flush: all has gone out
        }
        sc_core::sc_stop();
    }

    void count_irq() { irq_rises++; }

    unsigned reg_shift_, width_;
    std::string banner_;
    bool check_errors_;
};

void usage()
{
    std::fprintf(stderr, "usage: uartbridge_vp BUS [--reg-shift N] [--reg-io-width 1|4] "
                         "[--banner TEXT] [--check-errors]\n");
    std::exit(64);
}

} // namespace

int sc_main(int argc, char *argv[])
{
    if (argc < 2)
        usage();
    Uart16550Target::Config config;
    config.bus = argv[1];
    std::string banner = "uartbridge SystemC VP\r\n";
    bool check_errors = false;
    for (int i = 2; i < argc; i++) {
        std::string arg = argv[i];
        if (arg == "--reg-shift" && i + 1 < argc)
            config.reg_shift = static_cast<unsigned>(std::atoi(argv[++i]));
        else if (arg == "--reg-io-width" && i + 1 < argc)
            config.reg_io_width = static_cast<unsigned>(std::atoi(argv[++i]));
        else if (arg == "--banner" && i + 1 < argc)
            banner = argv[++i];
        else if (arg == "--check-errors")
            check_errors = true;
        else
            usage();
    }

    Uart16550Target *uart;
    try {
        uart = new Uart16550Target("uart", config);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "uartbridge_vp: %s\n", e.what());
        return 69;
    }
    PolledDriver cpu("cpu", config.reg_shift, config.reg_io_width, banner, check_errors);
    sc_core::sc_signal<bool> irq("irq_line");
    cpu.socket.bind(uart->socket);
    uart->irq(irq);
    cpu.irq(irq);

    sc_core::sc_start();

    std::printf("vp: echoed %lu bytes; irq rising edges %lu on the signal, %lu on the bus; "
                "%lu accesses; simulated %.0f ns\n",
                cpu.echoed, cpu.irq_rises, uart->rising_edges(), uart->accesses(),
                sc_core::sc_time_stamp().to_seconds() * 1e9);
    std::fflush(stdout);
    delete uart;
    return 0;
}
