#!/usr/bin/perl
# An SMSC for the end-to-end tests, on Net::SMPP (CPAN, Debian's libnet-smpp-perl): a PDU
# codec that is not ours, so that the bridge's SMPP client is checked against another
# implementation of the protocol.
#
#   net-smpp-smsc.pl SMPP_PORT CONTROL_PORT PASSWORD
#
# One ESME at a time may bind (bind_transceiver, checked password). submit_sm is answered with a
# message id (or ESME_RTHROTTLED while a throttle count is set) and recorded; enquire_link and
# unbind are answered. The test drives it over the control port, one command per line, each
# answered by lines ending with "END":
#   mo FROM TO HEXTEXT          deliver_sm (GSM default alphabet)  → "ok SEQ"
#   mo_payload FROM TO HEXTEXT  the same, the text in the message_payload TLV
#   receipt FROM TO MSGID STAT  deliver_sm delivery receipt         → "ok SEQ"
#   throttle N                  answer the next N submit_sm with ESME_RTHROTTLED
#   submits                     "submit MSGID SRC_TON SRC DST_TON DST DCS ESM REG HEXTEXT" each
#                               (HEXTEXT "p:…" when the text came in message_payload)
#   status                      "bound 0|1", "throttled N", "resp SEQ STATUS" for answered deliver_sm
use strict;
use warnings;
use IO::Select;
use IO::Socket::INET;
use Net::SMPP;

my ($smpp_port, $control_port, $password) = @ARGV;
die "usage: $0 SMPP_PORT CONTROL_PORT PASSWORD\n" unless defined $password;
$| = 1;

my $listener = Net::SMPP->new_listen('127.0.0.1', port => $smpp_port, smpp_version => 0x34)
    or die "cannot listen for SMPP on $smpp_port: $!\n";
my $control = IO::Socket::INET->new(
    LocalAddr => '127.0.0.1', LocalPort => $control_port, Proto => 'tcp', Listen => 5,
    ReuseAddr => 1) or die "cannot listen for control on $control_port: $!\n";
print "listening smpp=$smpp_port control=$control_port\n";

my $sel = IO::Select->new($listener, $control);
my ($esme, $bound, $throttle, $throttled, $next_id) = (undef, 0, 0, 0, 1);
my (@submits, @resps);

sub drop_esme {
    $sel->remove($esme);
    close $esme;
    ($esme, $bound) = (undef, 0);
    print "esme gone\n";
}

sub on_pdu {
    my $pdu = shift;
    my $cmd = $pdu->{cmd};
    if ($cmd == Net::SMPP::CMD_bind_transceiver) {
        my $ok = $pdu->{password} eq $password;
        $bound = $ok ? 1 : 0;
        $esme->bind_transceiver_resp(seq => $pdu->{seq}, status => ($ok ? 0 : 0x0e),
            system_id => 'netsmpp');
        print "bind system_id=$pdu->{system_id} ok=$bound\n";
    } elsif ($cmd == Net::SMPP::CMD_enquire_link) {
        $esme->enquire_link_resp(seq => $pdu->{seq});
    } elsif ($cmd == Net::SMPP::CMD_unbind) {
        $esme->unbind_resp(seq => $pdu->{seq});
        $bound = 0;
    } elsif ($cmd == Net::SMPP::CMD_submit_sm) {
        if ($throttle > 0) {
            $throttle--;
            $throttled++;
            $esme->submit_sm_resp(seq => $pdu->{seq}, status => 0x58, message_id => '');
            print "submit throttled\n";
            return;
        }
        my $id = sprintf('NS%04d', $next_id++);
        $esme->submit_sm_resp(seq => $pdu->{seq}, message_id => $id);
        my $text = unpack('H*', $pdu->{short_message});
        $text = 'p:' . unpack('H*', $pdu->{message_payload})
            if $text eq '' && defined $pdu->{message_payload};
        push @submits, join(' ', 'submit', $id, $pdu->{source_addr_ton}, $pdu->{source_addr},
            $pdu->{dest_addr_ton}, $pdu->{destination_addr}, $pdu->{data_coding},
            $pdu->{esm_class}, $pdu->{registered_delivery}, $text);
        print "$submits[-1]\n";
    } elsif ($cmd == Net::SMPP::CMD_deliver_sm_resp) {
        push @resps, "resp $pdu->{seq} $pdu->{status}";
        print "$resps[-1]\n";
    } elsif ($cmd & 0x80000000) {
        # Other responses need nothing.
    } else {
        $esme->generic_nack(seq => $pdu->{seq}, status => 0x03);
    }
}

sub deliver {
    my ($from, $to, $esm, $text, @tlvs) = @_;
    return "error not bound" unless $esme && $bound;
    my $seq = $esme->deliver_sm(async => 1, source_addr_ton => 1, source_addr_npi => 1,
        source_addr => $from, dest_addr_ton => 1, dest_addr_npi => 1, destination_addr => $to,
        esm_class => $esm, data_coding => 0, short_message => $text, @tlvs);
    return "ok $seq";
}

sub on_command {
    my @w = split ' ', shift;
    my $c = shift(@w) // '';
    if ($c eq 'mo' && @w == 3) {
        return deliver($w[0], $w[1], 0, pack('H*', $w[2]));
    } elsif ($c eq 'mo_payload' && @w == 3) {
        return deliver($w[0], $w[1], 0, '', message_payload => pack('H*', $w[2]));
    } elsif ($c eq 'receipt' && @w == 4) {
        my ($from, $to, $id, $stat) = @w;
        my $text = "id:$id sub:001 dlvrd:001 submit date:2612031200 done date:2612031201 "
            . "stat:$stat err:000 text:";
        my $state = $stat eq 'DELIVRD' ? 2 : 5;
        return deliver($from, $to, 0x04, $text, receipted_message_id => "$id\0",
            message_state => pack('C', $state));
    } elsif ($c eq 'throttle' && @w == 1) {
        $throttle = $w[0];
        return 'ok';
    } elsif ($c eq 'submits') {
        return join("\n", @submits);
    } elsif ($c eq 'status') {
        return join("\n", "bound $bound", "throttled $throttled", @resps);
    }
    return "error unknown command";
}

while (1) {
    for my $fh ($sel->can_read) {
        if ($fh == $listener) {
            my $conn = $listener->accept or next;
            drop_esme() if $esme;
            $esme = $conn;
            $sel->add($esme);
            print "esme connected\n";
        } elsif ($fh == $control) {
            my $c = $control->accept or next;
            $sel->add($c);
        } elsif ($esme && $fh == $esme) {
            my $pdu = $esme->read_pdu;
            if ($pdu) { on_pdu($pdu) } else { drop_esme() }
        } else {
            my $line = <$fh>;
            if (!defined $line) { $sel->remove($fh); close $fh; next }
            chomp $line;
            my $out = on_command($line);
            print $fh ($out eq '' ? '' : "$out\n"), "END\n";
        }
    }
}
